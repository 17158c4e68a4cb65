"""Evaluation metrics behind one small protocol, and the Frechet distance in float64.

A metric sees the generated images of one (model, step count) configuration, batch by batch::

    class Metric(Protocol):
        name: str                                                       # "clip", "fid", ...
        def reset(self) -> None                                         # forget generated images (references stay)
        def update(self, images: torch.Tensor, captions: list[str]) -> None   # (N, 3, H, W) float in [0, 1]
        def compute(self) -> dict[str, float]                           # {"clip_score": 0.31}

A metric that compares against reference images also has ``update_reference(images)``
(``ReferenceMetric``); ``students.evaluation.evaluate`` feeds it the reference set once, before any generation.
Here: ``ClipScore`` (open_clip, local or random weights), ``InceptionFID`` (torchmetrics'
``FrechetInceptionDistance`` on torch-fidelity's Inception with weights from a local file) and
``FeatureFrechetDistance`` (the Frechet distance in any feature space, e.g. an analyser CNN's).
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np

from teachers import frechet


@runtime_checkable
class Metric(Protocol):
    name: str

    def reset(self) -> None: ...

    def update(self, images, captions: list[str]) -> None: ...

    def compute(self) -> dict[str, float]: ...


@runtime_checkable
class ReferenceMetric(Metric, Protocol):
    def update_reference(self, images) -> None: ...


# ------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------


# One Frechet distance in the codebase (teachers.frechet); the names this module's callers use:
# ``frechet_distance_from_moments(mu1, sigma1, mu2, sigma2)`` and ``frechet_distance(feats_a, feats_b)``.
frechet_distance_from_moments = frechet.frechet_distance
frechet_distance = frechet.frechet_distance_of_features
moments = frechet.moments


class _RunningMoments:
    """Sum and sum of outer products in float64: the moments of many batches in O(D^2) memory."""

    def __init__(self):
        self.n, self.sum, self.outer = 0, None, None

    def add(self, feats) -> None:
        feats = np.asarray(feats, np.float64).reshape(len(feats), -1)
        if self.sum is None:
            self.sum, self.outer = np.zeros(feats.shape[1]), np.zeros((feats.shape[1],) * 2)
        self.n += len(feats)
        self.sum += feats.sum(axis=0)
        self.outer += feats.T @ feats

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"a Frechet distance needs at least 2 images on each side, got {self.n}")
        mean = self.sum / self.n
        return mean, (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)


class FeatureFrechetDistance:
    """Frechet distance in the feature space of ``extractor`` (images (N, 3, H, W) in [0, 1] -> (N, D)).

    For feature spaces other than Inception's (an analyser CNN for procedural teachers); reference
    features come through ``update_reference``. ``compute`` gives ``{key: distance}``.
    """

    def __init__(self, extractor: Callable, name: str = "fd", key: str | None = None):
        self.extractor, self.name, self.key = extractor, name, key or name
        self.reference, self.generated = _RunningMoments(), _RunningMoments()

    def _features(self, images):
        import torch

        with torch.inference_mode():
            return self.extractor(images).detach().double().cpu().numpy()

    def update_reference(self, images) -> None:
        self.reference.add(self._features(images))

    def reset(self) -> None:
        self.generated = _RunningMoments()

    def update(self, images, captions: list[str]) -> None:
        self.generated.add(self._features(images))

    def compute(self) -> dict[str, float]:
        return {self.key: frechet_distance_from_moments(*self.reference.get(), *self.generated.get())}


# ------------------------------------------------------------------------------------------
# FID (torchmetrics + torch-fidelity) and CLIP score (open_clip)
# ------------------------------------------------------------------------------------------


FID_FEATURES = (64, 192, 768, 2048)  # Inception taps torchmetrics offers; 2048 (pool3) is the FID of the papers


class InceptionFID:
    """FID with torchmetrics' ``FrechetInceptionDistance`` (torch-fidelity's TF-ported Inception-v3).

    ``weights_path``: torch-fidelity's Inception state dict (``weights-inception-2015-12-05-6726825d.pth``,
    downloaded where a network exists); nothing is downloaded here. Images are resized to 299 px
    inside the extractor (torch-fidelity's TF-1 compatible bilinear resize), so references and
    generated images only need the same size within a batch.
    """

    name = "fid"

    def __init__(self, weights_path: str, feature: int = 2048, device: str = "cpu"):
        import os

        from torchmetrics.image.fid import FrechetInceptionDistance

        if not weights_path or not os.path.isfile(weights_path):
            raise FileNotFoundError(f"Inception weights {weights_path!r} not found (nothing is downloaded here): "
                                    "pass the local torch-fidelity Inception-v3 .pth")
        if feature not in FID_FEATURES:
            raise ValueError(f"FID feature={feature} is not one of {FID_FEATURES}")
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True,
                                            feature_extractor_weights_path=weights_path).to(device)
        self.device = device

    def update_reference(self, images) -> None:
        self.fid.update(images.to(self.device).float(), real=True)

    def reset(self) -> None:
        self.fid.reset()  # reset_real_features=False: the reference statistics stay

    def update(self, images, captions: list[str]) -> None:
        self.fid.update(images.to(self.device).float(), real=False)

    def compute(self) -> dict[str, float]:
        return {"fid": float(self.fid.compute())}


def to_pil(images) -> list:
    """(N, 3, H, W) float in [0, 1] -> PIL images (rounded to uint8, as a saved PNG would be)."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


class ClipScore:
    """Mean image-caption cosine similarity under an open_clip model (``filters.clip_embed``: the same
    embedding and score as the curate job; not CLIPScore's 2.5 * max(cos, 0) or torchmetrics' 100 * cos)."""

    name = "clip"

    def __init__(self, clip):
        self.clip = clip
        self.total, self.count = 0.0, 0

    @classmethod
    def load(cls, model_name: str, weights: str, device: str = "cpu") -> "ClipScore":
        from filters.clip_embed import load_clip

        return cls(load_clip(model_name, weights, device))

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, images, captions: list[str]) -> None:
        from filters.clip_embed import clip_score, embed_images, embed_texts

        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        scores = clip_score(embed_images(self.clip, to_pil(images)), embed_texts(self.clip, list(captions)))
        self.total += float(np.sum(scores, dtype=np.float64))
        self.count += len(scores)

    def compute(self) -> dict[str, float]:
        return {"clip_score": self.total / self.count if self.count else float("nan")}
