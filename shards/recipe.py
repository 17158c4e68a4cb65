"""The dump recipe: what decides a teacher dump's bytes, as ``dataset.json`` records it under ``recipe``.

    SamplerConfig   the sampler's settings (steps, scheduler, guidance, size, recorded steps, features, ...);
                    ``teachers.sampler`` runs them
    DumpRecipe      the dump's recipe: the teacher and where it ran, storage, sharding, the input, and its
                    sampler settings once (``recipe.sampler``, a ``SamplerConfig``)

The JSON is flat (``DumpRecipe.to_json``): the sampler's fields sit beside the dump's, ``save_images``
for the sampler's ``save_images``, ``eta`` only when not 0 (the dump never set it), ``score_images`` and
``real_images`` only when on, so recipes keep the hash (``recipe_hash``) they had before each existed.
Every schema version (1 to 3) recorded the same flat recipe, so ``DumpRecipe.from_json`` reads them all
alike: an older recipe lacks only the fields added since (``score_images``, ``real_images``), which read
as off. A field a recipe does not hold (hand-made datasets) reads as ``None`` for the dump's fields and as
``SamplerConfig``'s default for the sampler's, except ``save_images``: True, as the trainer always took it.
Fields this version does not know are kept in ``extra`` and written back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from core.errors import UserError
from shards.record import SCHEMA_VERSION

def recipe_hash(recipe_json: dict) -> str:
    """16 hex digits of the sha256 of the recipe's sorted JSON: what guards an output folder (every shard
    index and ``dataset.json`` carry it)."""
    return hashlib.sha256(json.dumps(recipe_json, sort_keys=True).encode()).hexdigest()[:16]


SCHEDULERS = {  # recipe name -> diffusers class name
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",  # flow (SD3) teachers only, and their only one
}
FLOW_SCHEDULERS = ("flow-euler",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    num_inference_steps: int = 50  # teacher denoising steps S
    scheduler: str | None = None  # one of SCHEDULERS (DPM-Solver++ = multistep, algorithm dpmsolver++);
    #                               None: ddim for UNet teachers, flow-euler for flow teachers (resolve_config)
    guidance_scale: float = 7.5  # CFG weight w, used when guidance_range is None
    guidance_range: tuple[float, float] | None = None  # per-sample w ~ U[lo, hi] from the seed (SnapFusion: [2, 14])
    height: int | None = None  # image px; None = the teacher's native resolution
    width: int | None = None  # image px; None = the teacher's native resolution
    record_steps: tuple[int, ...] | None = None  # step indices (0..S-1) whose latents/predictions are kept; None = all
    feature_layers: tuple[str, ...] | None = None  # blocks whose outputs are captured; None: the teacher's
    #                     default (mid_block; a flow teacher's middle and last joint blocks: flow_feature_layers)
    num_feature_steps: int = 2  # feature steps per sample, drawn from the recorded steps by seed
    save_images: bool = False  # decode the final latent with the teacher VAE (and store the image)
    eta: float = 0.0  # DDIM eta (0 = deterministic)
    real_images: bool = False  # also encode a real image of each caption (teachers.real_image)

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise UserError(f"num_inference_steps={self.num_inference_steps} must be >= 1")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise UserError(f"scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        # Weights at or below 1 are allowed and mean "no CFG", as in diffusers (teachers.sampler);
        # negative ones are refused: diffusers would silently treat them as 1 too.
        if not 0 <= self.guidance_scale < math.inf:
            raise UserError(f"guidance_scale={self.guidance_scale} must be finite and >= 0 (at most 1 = no guidance, as diffusers)")
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            if not 0 <= lo <= hi < math.inf:
                raise UserError(f"guidance_range={self.guidance_range} must satisfy 0 <= lo <= hi < inf "
                                "(draws at most 1 run without guidance, as diffusers does)")
        if self.record_steps is not None:
            bad = [s for s in self.record_steps if not 0 <= s < self.num_inference_steps]
            if bad or len(set(self.record_steps)) != len(self.record_steps) or not self.record_steps:
                raise UserError(f"record_steps={self.record_steps} must be distinct indices in [0, {self.num_inference_steps})")
        if self.num_feature_steps < 0 or (self.feature_layers != () and self.num_feature_steps > len(self.recorded_steps)):
            raise UserError(f"num_feature_steps={self.num_feature_steps} must be between 0 and the number of recorded steps")

    @property
    def recorded_steps(self) -> tuple[int, ...]:
        return tuple(sorted(self.record_steps)) if self.record_steps is not None else tuple(range(self.num_inference_steps))


SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig))
_TUPLES = ("guidance_range", "record_steps", "feature_layers")  # JSON lists, tuples in the config


@dataclasses.dataclass(frozen=True, kw_only=True)
class DumpRecipe:
    """Everything that decides the dump's bytes. Its hash guards an output folder against mixing."""

    teacher: str  # teacher spec (built-in, folder, hub id)
    dtype: str  # teacher compute dtype
    device: str  # where the teacher runs (numerics differ across devices)
    sampler: SamplerConfig  # scheduler and feature layers resolved (the flag or the teacher family's default)
    storage_dtype: str  # float16 | float32 for stored arrays
    seeds_per_prompt: int  # generations per caption
    samples_per_shard: int  # shard size N
    batch_size: int  # samples per UNet batch (results agree to float tolerance across batch sizes)
    cpu_threads: int  # torch threads on CPU workers, 0 = default (CPU rounding depends on it)
    input_sha256: str  # the input file's content
    score_images: dict | None = None  # the scoring models (pipelines.scoring.ImageScoring's fields); None = off
    schema_version: int = SCHEMA_VERSION
    extra: dict = dataclasses.field(default_factory=dict)  # recorded fields this version does not know, kept

    def to_json(self) -> dict:
        """The flat recipe ``dataset.json`` records (module docstring)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("sampler", "extra")}
        out.update(dataclasses.asdict(self.sampler))
        if out["score_images"] is None:  # unscored recipes keep the hash they had before scoring existed
            del out["score_images"]
        if not out["real_images"]:  # the same for recipes without real images
            del out["real_images"]
        if out["eta"] == 0.0:  # the dump's eta, never recorded
            del out["eta"]
        return {**self.extra, **out}

    @property
    def hash(self) -> str:
        return recipe_hash(self.to_json())

    @classmethod
    def from_json(cls, d: dict, source: str = "recipe") -> "DumpRecipe":
        """The typed recipe of a recorded (flat) one, of any schema version (module docstring)."""
        if not isinstance(d, dict):
            raise UserError(f"{source} is not a JSON object")
        own = {f.name for f in dataclasses.fields(cls)} - {"sampler", "extra"}
        sampler = {k: d[k] for k in SAMPLER_FIELDS if k in d}
        sampler.setdefault("save_images", True)
        for name in _TUPLES:
            if sampler.get(name) is not None:
                sampler[name] = tuple(sampler[name])
        kwargs = {name: d.get(name) for name in own}
        if "schema_version" not in d:
            del kwargs["schema_version"]
        extra = {k: v for k, v in d.items() if k not in own and k not in SAMPLER_FIELDS}
        return cls(**kwargs, sampler=SamplerConfig(**sampler), extra=extra)

