"""The shapes analyser: a small CNN that reads a scene's five attributes back from pixels.

It is trained on rendered truth (``teachers.shapes.world``) with noise and blur augmentation, so it
also reads the slightly soft images a diffusion model draws. Two offline stand-ins for the papers'
metrics come from it:

- **prompt adherence** (stand-in for CLIP score): for generated images and the captions they were
  drawn from, the fraction of attributes the analyser reads as the caption says, averaged over the
  five attributes (TIFA-style: accuracy per question, then the mean); ``exact`` is the fraction of
  images with every attribute right (GenEval-style).
- **Frechet distance in its feature space** (stand-in for FID): the 256-d penultimate features of
  generated images against those of rendered truth images for the same captions.

Both follow the evaluation metric protocol of ``students.evaluation.evaluate``: ``update(images, captions)``
with float images [N, 3, H, W] in [0, 1], then ``compute() -> dict``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from teachers.shapes import world

FEATURE_DIM = 256
WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "analyser.safetensors")


class ShapesAnalyser(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))  # 32 -> 4
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, FEATURE_DIM), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(world.VALUES[name])) for name in world.ATTRIBUTES})

    def forward(self, images: torch.Tensor):
        """images [N, 3, 32, 32] in [0, 1] -> (features [N, 256], {attribute: logits})."""
        if images.shape[-2:] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            images = nn.functional.interpolate(images, size=(world.IMAGE_SIZE,) * 2, mode="area")
        feats = self.neck(self.body(images * 2 - 1))
        return feats, {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 256):
        """(features float64 [N, 256], labels int [N, 5] in ``world.ATTRIBUTES`` order)."""
        feats, labels = [], []
        for chunk in images.split(batch_size):
            f, logits = self(chunk.float())
            feats.append(f.double())
            labels.append(torch.stack([logits[name].argmax(1) for name in world.ATTRIBUTES], 1))
        return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise, blur and contrast jitter: make the analyser read soft, noisy generated images too."""
    n = images.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * 0.06
    images = images + sigma * torch.randn(images.shape, generator=generator)
    blur = torch.rand(n, generator=generator) < 0.5
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        images[blur] = nn.functional.conv2d(nn.functional.pad(images[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    scale = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.2
    return ((images - 0.5) * scale + 0.5).clamp(0, 1)


def load_analyser(path: str = WEIGHTS) -> ShapesAnalyser:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no analyser weights at {path!r}: train them with `python -m teachers.shapes.train`")
    model = ShapesAnalyser()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def truth_labels(captions: list[str]) -> np.ndarray:
    """[N, 5] class indices the captions ask for; a caption outside the grammar is an error."""
    rows = []
    for text in captions:
        scene = world.parse_caption(text)
        if scene is None:
            raise ValueError(f"caption {text!r} is not in the shapes world's grammar")
        rows.append(scene.labels)
    return np.array(rows, dtype=np.int64)


def render_truth(captions: list[str], seed: int = 0) -> torch.Tensor:
    """Rendered truth images of the captions: the reference set for the Frechet distance."""
    rng = np.random.default_rng(seed)
    scenes = [world.parse_caption(t) for t in captions]
    return world.to_tensor(np.stack([world.render(s, rng) for s in scenes]))


class Adherence:
    """Prompt adherence: per-attribute accuracy of the analyser's reading against the caption."""

    name = "adherence"

    def __init__(self, analyser: ShapesAnalyser | None = None):
        self.analyser = analyser or load_analyser()
        self.correct = []

    def reset(self) -> None:
        self.correct = []

    def update(self, images: torch.Tensor, captions: list[str]) -> None:
        _, labels = self.analyser.read(images)
        self.correct.append(labels == truth_labels(captions))

    def compute(self) -> dict:
        correct = np.concatenate(self.correct)
        out = {f"acc_{name}": float(correct[:, i].mean()) for i, name in enumerate(world.ATTRIBUTES)}
        out["adherence"] = float(correct.mean())
        out["exact"] = float(correct.all(1).mean())
        # standard errors of the two means over images (ddof 1): a difference between rows smaller than
        # about twice these cannot be told from the choice of captions and seeds
        n = len(correct)
        out["adherence_se"] = float(correct.mean(1).std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        out["exact_se"] = float(correct.all(1).std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        return out


class AnalyserFrechet:
    """Frechet distance between analyser features of generated and rendered-truth images."""

    name = "frechet_analyser"

    def __init__(self, analyser: ShapesAnalyser | None = None, seed: int = 0):
        self.analyser = analyser or load_analyser()
        self.seed = seed
        self.fake, self.real = [], []

    def reset(self) -> None:  # the truth is rendered per batch from the captions, so both sides restart
        self.fake, self.real = [], []

    def update(self, images: torch.Tensor, captions: list[str]) -> None:
        self.fake.append(self.analyser.read(images)[0])
        truth = render_truth(captions, seed=self.seed + len(self.real))
        self.real.append(self.analyser.read(truth)[0])

    def compute(self) -> dict:
        from teachers.frechet import frechet_distance_of_features

        return {"frechet_analyser": frechet_distance_of_features(np.concatenate(self.fake), np.concatenate(self.real))}
