"""The Frechet distance between Gaussians: the one implementation behind FID (``students.evaluation.metrics``)
and the shapes analyser's Frechet distance (``teachers.shapes.analyser``)."""

from __future__ import annotations

import warnings

import numpy as np


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2), in float64.

    ``mu``: (D,), ``sigma``: (D, D). Dowson and Landau (1982); the FID of Heusel et al. (arXiv
    1706.08500) is this over Inception features. As in pytorch-fid: when the product is singular
    enough that its square root is not finite, ``eps`` is added to both diagonals; a small
    imaginary part from rounding is dropped. ``ValueError`` when the shapes do not match.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"moment shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    with warnings.catch_warnings():  # few samples make S1 S2 singular; its square root is still what we want
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(mu1.size) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def moments(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D) with N - 1 in the denominator) of features ``(N, D)``, float64."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance_of_features(feats_a, feats_b) -> float:
    """Frechet distance between the Gaussians fitted to feature sets ``(N, D)`` and ``(M, D)``, float64."""
    return frechet_distance(*moments(feats_a), *moments(feats_b))
