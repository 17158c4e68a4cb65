"""The LAION aesthetic predictor v2: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Architecture of ``improved-aesthetic-predictor`` (christophschuhmann, ``simple_inference.py``):
``Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
Linear(64, 16), Linear(16, 1)`` in ``self.layers`` (the ReLUs are commented out in the released
linear-MSE model, so the predictor is affine at inference). Its state-dict keys are therefore
``layers.{0,2,4,6,7}.{weight,bias}``; the ReLU variant (``*-reluMSE.pth``: ReLU after every hidden
Linear) has ``layers.{0,3,6,9,11}`` and is recognised too. LAION-Aesthetics thresholds: 5, 6, 6.5.

    mlp = load_aesthetic_mlp("sac+logos+ava1-l14-linearMSE.pth")      # or .safetensors
    scores = aesthetic_scores(mlp, image_embeddings)                  # (n,) float32
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

HIDDEN = (1024, 128, 64, 16)
DROPOUT = (0.2, 0.2, 0.1)
_LINEAR_KEYS = {False: (0, 2, 4, 6, 7), True: (0, 3, 6, 9, 11)}  # relu -> indices of Linear layers


class AestheticMLP(nn.Module):
    """``input_size`` -> 1024 -> 128 -> 64 -> 16 -> 1, with the original's dropout layers."""

    def __init__(self, input_size: int = 768, relu: bool = False):
        super().__init__()
        self.input_size = input_size
        widths = (input_size, *HIDDEN)
        layers: list[nn.Module] = []
        for i in range(len(HIDDEN)):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if relu:
                layers.append(nn.ReLU())
            if i < len(DROPOUT):
                layers.append(nn.Dropout(DROPOUT[i]))
        layers.append(nn.Linear(HIDDEN[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, input_size) embeddings, already L2-normalised -> (batch, 1) scores."""
        return self.layers(x)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"aesthetic weights {path!r} not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)  # a Lightning checkpoint keeps it one level down
    # DataParallel / Lightning wrappers prefix every key; the original file has none.
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _layout(state: dict[str, torch.Tensor], path: str) -> bool:
    """True for the ReLU layout, False for the linear one; ``ValueError`` for anything else."""
    for relu, idx in _LINEAR_KEYS.items():
        expected = {f"layers.{i}.{p}" for i in idx for p in ("weight", "bias")}
        if set(state) == expected:
            return relu
    raise ValueError(f"aesthetic weights {path!r} have keys {sorted(state)[:12]}, expected the LAION "
                     "aesthetic predictor's layers.{0,2,4,6,7}.{weight,bias} (or the ReLU variant's)")


def aesthetic_input_size(path: str) -> int:
    """The embedding width the weights expect (768 for CLIP ViT-L/14), read from ``layers.0.weight``."""
    return int(_read_state_dict(path)["layers.0.weight"].shape[1])


def load_aesthetic_mlp(path: str, device: str = "cpu") -> AestheticMLP:
    """Load a state dict with the original key names into an eval-mode ``AestheticMLP``."""
    state = _read_state_dict(path)
    relu = _layout(state, path)
    mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]), relu=relu)
    mlp.load_state_dict({k: v.float() for k, v in state.items()})
    return mlp.to(device).eval()


def aesthetic_scores(mlp: AestheticMLP, image_embeddings: np.ndarray) -> np.ndarray:
    """(n, input_size) CLIP image embeddings -> (n,) float32 scores (about 1..10 for real weights).

    The embeddings are L2-normalised first, as in the original inference script.
    """
    x = np.asarray(image_embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != mlp.input_size:
        raise ValueError(f"aesthetic MLP takes (n, {mlp.input_size}) embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0, 1.0, norms)
    device = next(mlp.parameters()).device
    with torch.inference_mode():
        out = mlp(torch.from_numpy(x).to(device))
    return out[:, 0].float().cpu().numpy()
