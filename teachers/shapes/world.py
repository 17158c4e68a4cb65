"""The shapes world: procedurally generated captioned images whose truth is known.

One image holds one shape on a plain background. Five attributes, each from a small set, decide
it; the caption says all five in one fixed grammar:

    "a small red triangle at the top left on a grey background"
    "a large blue circle in the center on a white background"

Rendering is anti-aliased (drawn at 4x, box-downsampled) with jitter in position, size and colour,
so two images of one caption differ like two photographs of one scene. ``parse_caption`` inverts
``caption``; the analyser (``teachers.shapes.analyser``) is trained to read the attributes back
from pixels, which is how prompt adherence is measured without CLIP.

Everything is a pure function of a ``numpy.random.Generator``: the same seed gives the same images.

The 450 scenes split into ``train`` (405) and ``heldout`` (45, see ``heldout_scenes``): a teacher
trained on the training split alone is evaluated on captions it never saw, whose every value, pair,
triple and four of five attributes it did see together.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

IMAGE_SIZE = 32  # pixels per side: the teacher's resolution (VAE factor 4 -> 8x8 latents)

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB
    "red": (215, 45, 40),
    "green": (40, 165, 65),
    "blue": (45, 85, 220),
    "yellow": (235, 205, 40),
    "purple": (145, 60, 185),
}
SIZES = {"small": 0.13, "large": 0.22}  # half-extent as a fraction of the image side
POSITIONS = {  # name -> centre (x, y) as fractions of the image side; caption phrase
    "top left": ((0.27, 0.27), "at the top left"),
    "top right": ((0.73, 0.27), "at the top right"),
    "bottom left": ((0.27, 0.73), "at the bottom left"),
    "bottom right": ((0.73, 0.73), "at the bottom right"),
    "center": ((0.5, 0.5), "in the center"),
}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (238, 238, 238), "black": (22, 22, 22)}

ATTRIBUTES = ("shape", "colour", "size", "position", "background")
VALUES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
_OVERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges

_CAPTION_RE = re.compile(
    r"^a (?P<size>small|large) (?P<colour>\w+) (?P<shape>\w+) "
    r"(?P<position>at the top left|at the top right|at the bottom left|at the bottom right|in the center) "
    r"on an? (?P<background>\w+) background$"
)


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self):
        for name in ATTRIBUTES:
            if getattr(self, name) not in VALUES[name]:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {VALUES[name]}")

    @property
    def labels(self) -> tuple[int, ...]:
        """Class index of each attribute, in ``ATTRIBUTES`` order."""
        return tuple(VALUES[name].index(getattr(self, name)) for name in ATTRIBUTES)

    @classmethod
    def from_labels(cls, labels) -> "Scene":
        return cls(**{name: VALUES[name][int(i)] for name, i in zip(ATTRIBUTES, labels)})


def caption(scene: Scene) -> str:
    return (f"a {scene.size} {scene.colour} {scene.shape} {POSITIONS[scene.position][1]} "
            f"on a {scene.background} background")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None if it is not in the world's grammar."""
    m = _CAPTION_RE.match(text.strip().lower())
    if m is None:
        return None
    phrase = m["position"]
    position = next(name for name, (_, p) in POSITIONS.items() if p == phrase)
    try:
        return Scene(m["shape"], m["colour"], m["size"], position, m["background"])
    except ValueError:
        return None


def all_scenes() -> list[Scene]:
    """Every scene of the world (3 x 5 x 2 x 5 x 3 = 450), in a fixed order."""
    import itertools

    return [Scene(*combo) for combo in itertools.product(*(VALUES[name] for name in ATTRIBUTES))]


# ------------------------------------------------------------------------------------------
# the held-out split
# ------------------------------------------------------------------------------------------

SPLITS = ("train", "heldout")


def heldout_scenes() -> list[Scene]:
    """The 45 held-out scenes (10% of the world), in a fixed order.

    A closed-form balanced design, not a random draw, so it never changes: one held-out scene per
    (shape s, colour c, background b) triple, at position ``(c + s + 3b) mod 5`` and size
    ``(s + c + b) mod 2`` (indices into ``VALUES``). So each shape and background is held out 15
    times, each colour and position 9 times, each size 22 or 23; every pair of attribute values is
    held out the floor or ceiling of its fair share (10% of its scenes); and no two
    held-out scenes agree on four attributes. Hence the training split keeps every value, every pair,
    every triple and, for each held-out scene, each of its five four-attribute sub-combinations (the
    scene with any one attribute changed is a training scene): held out is only the composition.
    """
    out = []
    for s in range(len(SHAPES)):
        for c in range(len(COLOURS)):
            for b in range(len(BACKGROUNDS)):
                p, z = (c + s + 3 * b) % len(POSITIONS), (s + c + b) % len(SIZES)
                out.append(Scene.from_labels((s, c, z, p, b)))
    return out


_HELDOUT = frozenset(heldout_scenes())


def split_of(scene: Scene) -> str:
    """``"heldout"`` or ``"train"``."""
    return "heldout" if scene in _HELDOUT else "train"


def train_scenes() -> list[Scene]:
    """The 405 training scenes, in ``all_scenes`` order."""
    return [s for s in all_scenes() if s not in _HELDOUT]


def split_scenes(split: str | None) -> list[Scene]:
    """The scenes of ``split`` (``"train"``, ``"heldout"``; ``None`` or ``"all"``: every scene)."""
    if split in (None, "all"):
        return all_scenes()
    if split == "train":
        return train_scenes()
    if split == "heldout":
        return heldout_scenes()
    raise ValueError(f"split {split!r} is not one of all, {', '.join(SPLITS)}")


def write_split_captions(folder: str) -> dict[str, str]:
    """``captions_train.txt`` and ``captions_heldout.txt`` in ``folder``: each scene of the split once,
    one caption a line. Returns ``{split: path}``."""
    import os

    os.makedirs(folder, exist_ok=True)
    paths = {}
    for split in SPLITS:
        paths[split] = os.path.join(folder, f"captions_{split}.txt")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.write("\n".join(caption(s) for s in split_scenes(split)) + "\n")
    return paths


def random_scenes(rng: np.random.Generator, n: int, scenes: list[Scene] | None = None) -> list[Scene]:
    """``n`` scenes drawn uniformly: every attribute independently, or from ``scenes`` when given."""
    if scenes is not None:
        return [scenes[int(i)] for i in rng.integers(0, len(scenes), n)]
    idx = np.stack([rng.integers(0, len(VALUES[name]), n) for name in ATTRIBUTES], axis=1)
    return [Scene.from_labels(row) for row in idx]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        corners = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":  # upright equilateral-ish triangle filling the same box
        corners = [(0.0, -r), (r, r * 0.85), (-r, r * 0.85)]
    else:
        return None
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image of ``scene``: uint8 array (size, size, 3), jittered by ``rng``."""
    from PIL import Image, ImageDraw

    big = size * _OVERSAMPLE
    bg = np.clip(np.array(BACKGROUNDS[scene.background]) + rng.normal(0, 6, 3), 0, 255).astype(int)
    fg = np.clip(np.array(COLOURS[scene.colour]) + rng.normal(0, 10, 3), 0, 255).astype(int)
    (fx, fy), _ = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-0.03, 0.03)) * big
    cy = (fy + rng.uniform(-0.03, 0.03)) * big
    r = SIZES[scene.size] * rng.uniform(0.92, 1.08) * big
    angle = rng.uniform(-0.2, 0.2)
    img = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    poly = _polygon(scene.shape, cx, cy, r, angle)
    if poly is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in fg))
    else:
        draw.polygon(poly, fill=tuple(int(v) for v in fg))
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)


def sample_batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE, scenes: list[Scene] | None = None):
    """``(images uint8 [n, size, size, 3], scenes)`` of ``n`` random scenes (drawn from ``scenes`` if given)."""
    scenes = random_scenes(rng, n, scenes)
    return np.stack([render(s, rng, size) for s in scenes]), scenes


def to_tensor(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def write_cycled_captions(path: str, n: int, split: str | None = None) -> str:
    """A captions file of ``n`` lines: every scene of ``split`` (``None``/``"all"``: the world) once in a
    fixed order, then round again (evaluation sets: each scene equally often). Returns ``path``."""
    scenes = split_scenes(split)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(caption(scenes[i % len(scenes)]) for i in range(n)) + "\n")
    return path


def write_captions(path: str, n: int, seed: int = 0, split: str | None = None) -> list[str]:
    """A captions file of ``n`` random scenes (one per line): input for the curation job and the dump.
    ``split`` (``"train"``, ``"heldout"``) draws them from that split only."""
    rng = np.random.default_rng(seed)
    lines = [caption(s) for s in random_scenes(rng, n, None if split in (None, "all") else split_scenes(split))]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(allow_abbrev=False, description="Write the shapes world's split caption files.")
    p.add_argument("folder", help="writes captions_train.txt and captions_heldout.txt here")
    args = p.parse_args(argv)
    for split, path in write_split_captions(args.folder).items():
        print(f"{split}: {len(split_scenes(split))} captions -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
