"""The sample record: the one schema shared by the dump writer and the trainer's reader.

One WebDataset sample = one (prompt, seed) generation. Members of a sample (``<key>.<ext>``):

    json                        metadata: prompt, seed, guidance, teacher, scheduler, noise levels, shapes
    txt                         the caption (UTF-8)
    prompt_embeds.npy           (L, D) text encoder hidden states (L = 77; SD3: 77 CLIP + 256 T5 tokens)
    pooled_prompt_embeds.npy    (D2,) SDXL and SD3 only
    add_time_ids.npy            (6,) SDXL only
    noise.npy                   (C, h, w) initial noise (C = 4; SD3: 16)
    latents.npy                 (S + 1, C, h, w) the denoiser's input z_t at each recorded step, then the final latent
    pred_cond.npy               (S, C, h, w) teacher output (epsilon, v or flow velocity: json "prediction_type")
    pred_uncond.npy             (S, C, h, w) teacher output with the empty prompt

Schema 2, one parameterisation whatever the scheduler: ``latents[i]`` is the variance-preserving
``z_t = alphas[i] x0 + sigmas[i] eps`` that the UNet received at recorded step i (for Euler, the
scaled ``x / sqrt(s^2 + 1)``, not its variance-exploding state; see ``teachers.sampler``). The json
holds ``timesteps`` (all S, exact floats: Euler's are not integers), ``recorded_steps`` and, per
recorded step, ``alphas`` and ``sigmas`` (float64), plus ``final_alpha``/``final_sigma`` of the
final latent. ``guidance_scale`` is the float32 weight applied (1.0 where CFG was off, w <= 1).
Every reader converts through ``noise_levels(meta)``; schema-1 DDIM and DPM-Solver++ dumps (whose
latents were z_t already, at integer timesteps) are converted from their scheduler config there,
and schema-1 Euler dumps (unscaled latents) are refused.

Schema 3 adds flow-matching teachers (SD3: ``StableDiffusion3Pipeline``). ``prediction_type`` is
one of ``PREDICTION_TYPES``: ``epsilon`` and ``v_prediction`` (variance-preserving, alpha^2 + sigma^2
= 1, as in schema 2) or ``flow``: rectified flow, ``latents[i] = alphas[i] x0 + sigmas[i] eps`` with
alpha = 1 - sigma (the Euler state the transformer received; ``alphas[0]`` is 0 at sigma = 1) and
``pred_*`` the velocity v = eps - x0 (so x0 = z - sigma v, eps = z + alpha v). Features of a
transformer teacher are ``feats.transformer_blocks.N``: its image tokens as (C, h/p, w/p) maps over
the patch grid. ``noise_process(meta)`` says which: schema 1 and 2 records are variance-preserving
(nothing else could be dumped then), so they read unchanged as schema 3 ones. The version moved so
that readers of schema 2 refuse flow records instead of reading velocities as epsilon.
    feats.<layer>.npy           (F, C, H, W) block outputs at the feature steps (cond branch)
    png                         decoded image (optional)
    image_latents.npy           (4, h, w) a real image of the caption encoded by the teacher's VAE
                                (``--real_images``; optional, see below)

With ``--real_images`` every sample also holds ``image_latents``: the teacher VAE's encoding (the
posterior mean times ``scaling_factor``, the latents the teacher was trained on) of a real image of
its caption, at the dump's resolution: the input row's ``image`` (a path or URL, read through
``core.fs``), or, for the built-in ``shapes`` teacher, the ground-truth render of the caption
(``teachers.shapes.world``, seeded by the sample's seed). An adversarial student's discriminator
can take these as its "real" side (``distill train --adv_real image``). A sample whose real image
is missing or unreadable is rejected (``no_real_image``, ``broken_image``), so every sample of such
a dump has one; ``dataset.json``'s recipe says ``real_images: true``.

With ``--score_images`` the json also holds ``image_scores``: ``{"clip_model", "clip_score",
"aesthetic_score"}`` of the decoded image (CLIP image-text cosine against the sample's own prompt;
the aesthetic score is null without aesthetic weights). The image embedding itself is not a member:
it sits in the shard's ``NNNNNN.emb.npy`` sidecar (``shards.writer``), where a filter reads it
without touching the tar.

The predictions are ``pred_*``, not ``eps_*``, because v-prediction teachers record v, and
``json["prediction_type"]`` says which.

Integrity: the shard index holds a checksum of every member's bytes (``member_checksum``);
``check_sample`` compares a sample's members with them and ``nonfinite_members`` finds arrays holding
NaN/Inf, so every reader can refuse a corrupt sample with a reason code (``CHECKSUM_MISMATCH``,
``NON_FINITE``, ``MISSING_MEMBER``).

Arrays are stored as float16 (``storage_dtype``) unless a value overflows float16's range: that
array is then stored as float32 instead of as inf, and the encoder reports it. Arrays are written
and read with ``allow_pickle=False``. Keys are ASCII without dots (WebDataset splits on dots).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import re
import zlib

import numpy as np

from core.errors import UserError

SCHEMA_VERSION = 3  # of the sample json, the shard index and dataset.json
SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3)  # what readers accept (1: see noise_levels; 1, 2: see noise_process)

FLOW = "flow"  # prediction_type of rectified-flow (SD3) teachers: the velocity v = eps - x0
PREDICTION_TYPES = ("epsilon", "v_prediction", FLOW)
VARIANCE_PRESERVING = "variance_preserving"  # z = alpha x0 + sigma eps, alpha^2 + sigma^2 = 1
RECTIFIED_FLOW = "rectified_flow"  # z = (1 - sigma) x0 + sigma eps

JSON = "json"
TXT = "txt"
PROMPT_EMBEDS = "prompt_embeds.npy"
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds.npy"
ADD_TIME_IDS = "add_time_ids.npy"
NOISE = "noise.npy"
LATENTS = "latents.npy"
PRED_COND = "pred_cond.npy"
PRED_UNCOND = "pred_uncond.npy"
FEATS_PREFIX = "feats."
IMAGE = "png"
IMAGE_LATENTS = "image_latents.npy"  # --real_images: a real image of the caption, VAE-encoded
IMAGE_SCORES = "image_scores"  # json field: scores of the decoded image

# SampleResult attribute -> member extension, in the order members are written to the tar.
ARRAY_FIELDS = {
    "prompt_embeds": PROMPT_EMBEDS,
    "pooled_prompt_embeds": POOLED_PROMPT_EMBEDS,
    "add_time_ids": ADD_TIME_IDS,
    "noise": NOISE,
    "latents": LATENTS,
    "pred_cond": PRED_COND,
    "pred_uncond": PRED_UNCOND,
    "image_latents": IMAGE_LATENTS,
}
STORAGE_DTYPES = ("float16", "float32")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")  # a sample key: ASCII letters, digits, '-', '_' (no dots)
_FP16_MAX = float(np.finfo(np.float16).max)


# Reason codes of BadRecord (filters/reasons.py lists every code a job emits).
NON_FINITE = "non_finite"  # an array holds NaN/Inf (at encoding, or found by a reader)
NON_FINITE_IMAGE = "non_finite_image"  # the decoded image holds NaN/Inf
NO_REAL_IMAGE = "no_real_image"  # --real_images: the row has no image and the teacher renders no truth
BROKEN_IMAGE = "broken_image"  # --real_images: the row's image cannot be read or decoded
BAD_KEY = "bad_key"
BAD_JSON = "bad_json"
SCHEMA = "schema_version"
CORRUPT_MEMBER = "corrupt_member"  # a member that does not parse (npy, UTF-8)
CHECKSUM_MISMATCH = "checksum_mismatch"  # a member's bytes differ from the index's checksum
MISSING_MEMBER = "missing_member"  # a member the index lists is absent (or one it does not list is present)


class BadRecord(ValueError):
    """A sample that cannot be stored (non-finite teacher output, bad key); ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass
class Record:
    """A decoded sample: ``meta`` is the json member; arrays keep their stored dtype."""

    key: str
    meta: dict
    caption: str
    arrays: dict[str, np.ndarray]  # SampleResult attribute name -> array
    feats: dict[str, np.ndarray]  # layer name -> (F, C, H, W)
    image_png: bytes | None = None

    def __getattr__(self, name):  # record.latents, record.prompt_embeds, ...
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)


def check_key(key: str) -> str:
    """``key`` if it matches ``KEY_PATTERN``, else ``BadRecord("bad_key")``."""
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise BadRecord(BAD_KEY, f"key {key!r} must be ASCII letters, digits, '-' or '_' (no dots)")
    return key


def feature_ext(layer: str) -> str:
    return f"{FEATS_PREFIX}{layer}.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def to_storage(name: str, array: np.ndarray, storage_dtype: str) -> tuple[np.ndarray, bool]:
    """Cast for storage. Returns (array, fell_back_to_float32). Non-finite input is a BadRecord."""
    array = np.asarray(array)
    if not np.isfinite(array).all():
        raise BadRecord(NON_FINITE, f"{name} contains NaN or Inf")
    if storage_dtype == "float32":
        return array.astype(np.float32), False
    if np.abs(array).max(initial=0.0) > _FP16_MAX:  # would round to inf in float16
        return array.astype(np.float32), True
    return array.astype(np.float16), False


def encode_sample(result, meta: dict, *, storage_dtype: str = "float16",
                  image_scores: dict | None = None) -> tuple[dict[str, bytes], dict]:
    """SampleResult + shared metadata -> (WebDataset sample dict, stats).

    ``meta`` holds what the dump adds (teacher, dtype, scheduler, timesteps, recipe hash ...);
    ``image_scores`` (scored dumps) goes into the json as ``image_scores``.
    stats: ``{"fp32_fallback": [array names stored as float32 because float16 overflowed]}``.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype {storage_dtype!r} is not one of {STORAGE_DTYPES}")
    key = check_key(result.key)
    sample: dict[str, bytes] = {"__key__": key}
    fallback, dtypes, shapes = [], {}, {}
    arrays = [(attr, ext, getattr(result, attr)) for attr, ext in ARRAY_FIELDS.items()]
    arrays += [(f"feats.{layer}", feature_ext(layer), arr) for layer, arr in sorted(result.feats.items())]
    encoded = {}
    for name, ext, array in arrays:
        if array is None:
            continue
        stored, fell_back = to_storage(name, array, storage_dtype)
        if fell_back:
            fallback.append(name)
        dtypes[name], shapes[name] = str(stored.dtype), list(stored.shape)
        encoded[ext] = npy_bytes(stored)
    if getattr(result, "image_error", None):  # after the arrays: a NaN trajectory is reported as such
        raise BadRecord(result.image_error, f"sample {key!r}: the decoded image holds NaN or Inf")
    if getattr(result, "real_image_error", None):
        reason, _, detail = result.real_image_error.partition(": ")
        raise BadRecord(reason, f"sample {key!r}: {detail or 'no real image'}")
    info = dict(meta, schema_version=SCHEMA_VERSION, key=key, prompt=result.prompt, seed=int(result.seed),
                guidance_scale=float(result.guidance_scale), num_tokens=int(result.num_tokens),
                feature_steps=[int(s) for s in result.feature_steps], array_dtypes=dtypes, array_shapes=shapes)
    schedule = getattr(result, "noise_schedule", None)
    if schedule is not None:  # the sampler's exact values win over what the caller's meta repeats
        info.update(schedule.to_json())
    if image_scores is not None:
        info[IMAGE_SCORES] = image_scores
    sample[JSON] = json.dumps(info, sort_keys=True, ensure_ascii=True).encode("ascii")
    sample[TXT] = result.prompt.encode("utf-8")
    sample.update(encoded)
    if result.image is not None:
        sample[IMAGE] = png_bytes(result.image)
    return sample, {"fp32_fallback": fallback}


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of a uint8 (H, W, 3) image; a float image is refused (a NaN cast to uint8 looks valid)."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        if not np.isfinite(image).all():
            raise BadRecord(NON_FINITE_IMAGE, "the decoded image holds NaN or Inf")
        raise ValueError(f"png_bytes takes a uint8 image, got {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_sample(sample: dict[str, bytes]) -> Record:
    """WebDataset sample dict (raw bytes per extension) -> Record.

    ``BadRecord`` (a reason code for the reader to count) when the json is unreadable or of an
    unsupported schema, a member does not parse, an array the json lists is missing or has another
    shape, or an array holds NaN/Inf.
    """
    try:
        meta = json.loads(sample[JSON])
    except (KeyError, ValueError) as err:
        raise BadRecord(BAD_JSON, f"sample {sample.get('__key__')!r}: {err}") from None
    if not isinstance(meta, dict) or meta.get("schema_version") not in SUPPORTED_SCHEMA_VERSIONS:
        found = meta.get("schema_version") if isinstance(meta, dict) else None
        raise BadRecord(SCHEMA, f"sample {sample.get('__key__')!r} has schema {found!r}, this reader "
                        f"understands {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}")
    arrays, feats = {}, {}
    try:
        for attr, ext in ARRAY_FIELDS.items():
            if ext in sample:
                arrays[attr] = load_npy(sample[ext])
        for ext, data in sample.items():
            if ext.startswith(FEATS_PREFIX) and ext.endswith(".npy"):
                feats[ext[len(FEATS_PREFIX) : -len(".npy")]] = load_npy(data)
        caption = sample[TXT].decode("utf-8")
    except (KeyError, ValueError, UnicodeDecodeError) as err:
        raise BadRecord(CORRUPT_MEMBER, f"sample {sample.get('__key__')!r}: {err}") from None
    key = sample.get("__key__")
    got = {**arrays, **{f"feats.{layer}": a for layer, a in feats.items()}}
    shapes = meta.get("array_shapes") or {}
    missing = sorted(set(shapes) - set(got))
    if missing:  # a shard cut short, or a member lost: the json says what was stored
        raise BadRecord(MISSING_MEMBER, f"sample {key!r}: {', '.join(missing)} missing (the json lists them)")
    wrong = [name for name, shape in shapes.items() if list(got[name].shape) != list(shape)]
    if wrong:
        raise BadRecord(CORRUPT_MEMBER, f"sample {key!r}: {', '.join(wrong)} differ from the shapes in the json")
    bad = [name for name, a in got.items() if not np.isfinite(a).all()]
    if bad:  # float16 storage of a finite value is finite (overflow falls back to float32): corruption
        raise BadRecord(NON_FINITE, f"sample {sample.get('__key__')!r}: {', '.join(bad)} hold NaN or Inf")
    return Record(key=sample.get("__key__", meta.get("key")), meta=meta, caption=caption, arrays=arrays,
                  feats=feats, image_png=sample.get(IMAGE))


def field_of(ext: str) -> str:
    """Group name of a member extension for size accounting (``feats.mid_block.npy`` -> ``feats``)."""
    return "feats" if ext.startswith(FEATS_PREFIX) else ext


# ---------------------------------------------------------------------------------------------
# noise levels: the one conversion from a record's json to where its latents sit
# ---------------------------------------------------------------------------------------------

_SCHEMA1_VP = ("DDIMScheduler", "DPMSolverMultistepScheduler")  # schema-1 latents were z_t already
_NONINTEGER_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def noise_levels(meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps, alphas, sigmas) of a record's recorded steps: float64 arrays, each (S,).

    Row i goes with ``latents[i]``, ``pred_cond[i]``, ``pred_uncond[i]``:
    ``latents[i] = alphas[i] x0 + sigmas[i] eps`` and the UNet ran at ``timesteps[i]``.
    ``meta`` is the sample's json (``Record.meta``). Schemas 2 and 3 store these (a schema-3 flow
    record's alphas are 1 - sigmas: ``noise_process``); schema 1 DDIM and
    DPM-Solver++ records are converted from their scheduler config (integer timesteps,
    ``alphas_cumprod``); anything else is a ``UserError`` saying why and to re-dump.
    """
    version, key = meta.get("schema_version"), meta.get("key")
    try:
        recorded = [int(s) for s in meta["recorded_steps"]]
        timesteps = np.asarray(meta["timesteps"], np.float64)[recorded]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise UserError(f"sample {key!r}: no usable timesteps/recorded_steps in its json ({err})") from None
    if version in (2, 3):
        try:
            alphas, sigmas = np.asarray(meta["alphas"], np.float64), np.asarray(meta["sigmas"], np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"sample {key!r}: schema-{version} json without alphas/sigmas ({err})") from None
        if alphas.shape != timesteps.shape or sigmas.shape != timesteps.shape:
            raise UserError(f"sample {key!r}: {alphas.size} alphas and {sigmas.size} sigmas for "
                            f"{timesteps.size} recorded steps")
        return timesteps, alphas, sigmas
    if version != 1:
        raise UserError(f"sample {key!r} has schema_version {version!r}; supported: "
                        f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}")
    abar = _schema1_alphas_cumprod(meta)[np.round(timesteps).astype(np.int64)]
    return timesteps, np.sqrt(abar), np.sqrt(1.0 - abar)


def final_noise_level(meta: dict) -> tuple[float, float]:
    """(alpha, sigma) of a record's final latent ``latents[-1]``: (1, 0) except where DDIM ends at
    ``alphas_cumprod[0]`` (``set_alpha_to_one=False``, as Stable Diffusion's config has it)."""
    if meta.get("schema_version") in (2, 3):
        return float(meta["final_alpha"]), float(meta["final_sigma"])
    abar = _schema1_alphas_cumprod(meta)
    config = meta["scheduler_config"]
    if meta["scheduler_class"] == "DDIMScheduler":
        final = 1.0 if config.get("set_alpha_to_one", True) else float(abar[0])
    else:
        final = 1.0 if config.get("final_sigmas_type", "zero") == "zero" else float(abar[0])
    return float(np.sqrt(final)), float(np.sqrt(1.0 - final))


def noise_process(meta: dict) -> str:
    """``VARIANCE_PRESERVING`` or ``RECTIFIED_FLOW``: how a record's (or ``dataset.json``'s) latents
    mix x0 and eps and what its predictions are (module docstring). The conversion for older
    versions: schema 1 and 2 only knew variance-preserving teachers, whatever their json says."""
    version, kind = meta.get("schema_version"), meta.get("prediction_type") or "epsilon"
    if version in (1, 2):
        return VARIANCE_PRESERVING
    if kind not in PREDICTION_TYPES:
        raise UserError(f"{meta.get('key') or 'dataset'!r}: prediction_type {kind!r} is not one of "
                        f"{', '.join(PREDICTION_TYPES)}")
    return RECTIFIED_FLOW if kind == FLOW else VARIANCE_PRESERVING


def _schema1_alphas_cumprod(meta: dict) -> np.ndarray:
    cls, key, config = meta.get("scheduler_class"), meta.get("key"), meta.get("scheduler_config") or {}
    if cls not in _SCHEMA1_VP or any(config.get(k) for k in _NONINTEGER_SIGMAS):
        raise UserError(f"sample {key!r} is a schema-1 record made with {cls}: its latents are not the "
                        "UNet's input z_t or its timesteps were truncated to integers, so its targets would "
                        "be wrong; re-dump it with this version (schema 2)")
    return alphas_cumprod(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=16)
def alphas_cumprod(scheduler_config_json: str) -> np.ndarray:
    """A scheduler config's ``alphas_cumprod`` (float64 copy of the float32 table diffusers samples
    with: the same betas code, so the same values). Keyed by the config's sorted JSON for caching."""
    import diffusers

    config = json.loads(scheduler_config_json)
    table = diffusers.DDPMScheduler.from_config(config).alphas_cumprod
    table = table.double().numpy()
    table.flags.writeable = False
    return table


# ---------------------------------------------------------------------------------------------
# integrity: per-member checksums (kept in the shard index) and non-finite arrays
# ---------------------------------------------------------------------------------------------

CHECKSUM_ALGORITHM = "crc32"  # zlib's CRC-32 of a member's bytes, 8 hex digits: catches every burst of <= 32 flipped bits


def member_checksum(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def verify_members(checksums: dict[str, str] | None, sample: dict[str, bytes]) -> None:
    """Raise ``BadRecord`` (``missing_member`` or ``checksum_mismatch``, naming the key and member)
    unless ``sample``'s members (``{ext: bytes}``, ``__key__`` ignored) are exactly those of
    ``checksums`` (the index's entry for the key) with equal checksums. ``None`` (an index written
    before checksums existed) checks nothing."""
    if checksums is None:
        return
    key = sample.get("__key__")
    present = {ext for ext in sample if not ext.startswith("__")}
    missing, extra = sorted(set(checksums) - present), sorted(present - set(checksums))
    if missing or extra:
        raise BadRecord(MISSING_MEMBER, f"sample {key!r}: members missing {missing}, not in the index {extra}")
    for ext in sorted(checksums):
        if member_checksum(sample[ext]) != checksums[ext]:
            raise BadRecord(CHECKSUM_MISMATCH, f"sample {key!r}: member {ext} differs from its index checksum")


def check_sample(checksums: dict[str, str] | None, sample: dict[str, bytes]) -> str | None:
    """The reason code why ``sample`` does not match its index checksums, or None (see ``verify_members``)."""
    try:
        verify_members(checksums, sample)
    except BadRecord as err:
        return err.reason
    return None


def nonfinite_members(sample: dict[str, bytes]) -> list[str]:
    """The ``.npy`` members of ``sample`` holding NaN or Inf (``BadRecord("corrupt_member")`` if one
    does not parse). ``decode_sample`` refuses such samples itself; this is for byte-level readers."""
    bad = []
    for ext, data in sorted(sample.items()):
        if ext.endswith(".npy"):
            try:
                array = load_npy(data)
            except ValueError as err:
                raise BadRecord(CORRUPT_MEMBER, f"sample {sample.get('__key__')!r}: {ext}: {err}") from None
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                bad.append(ext)
    return bad
