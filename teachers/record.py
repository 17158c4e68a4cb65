"""The sample record: the one schema shared by the dump writer and the trainer's reader.

One WebDataset sample = one (prompt, seed) generation. Members of a sample (``<key>.<ext>``):

    json                        metadata: prompt, seed, guidance, teacher, scheduler, timesteps, steps, shapes
    txt                         the caption (UTF-8)
    prompt_embeds.npy           (77, D) text encoder hidden states
    pooled_prompt_embeds.npy    (D2,) SDXL only
    add_time_ids.npy            (6,) SDXL only
    noise.npy                   (4, h, w) initial noise
    latents.npy                 (S + 1, 4, h, w) latent before each recorded step, then the final latent
    pred_cond.npy               (S, 4, h, w) teacher output (epsilon or v: json "prediction_type") with the prompt
    pred_uncond.npy             (S, 4, h, w) teacher output with the empty prompt
    feats.<layer>.npy           (F, C, H, W) block outputs at the feature steps (cond branch)
    png                         decoded image (optional)

With ``--score_images`` the json also holds ``image_scores``: ``{"clip_model", "clip_score",
"aesthetic_score"}`` of the decoded image (CLIP image-text cosine against the sample's own prompt;
the aesthetic score is null without aesthetic weights). The image embedding itself is not a member:
it sits in the shard's ``NNNNNN.emb.npy`` sidecar (``teachers.shards``), where a filter reads it
without touching the tar.

The schema sketch in ARCHITECTURE.md called the predictions ``eps_*``; they are ``pred_*`` here
because v-prediction teachers record v, and ``json["prediction_type"]`` says which.

Arrays are stored as float16 (``storage_dtype``) unless a value overflows float16's range: that
array is then stored as float32 instead of as inf, and the encoder reports it. Arrays are written
and read with ``allow_pickle=False``. Keys are ASCII without dots (WebDataset splits on dots).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np

SCHEMA_VERSION = 1

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
}
STORAGE_DTYPES = ("float16", "float32")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_FP16_MAX = float(np.finfo(np.float16).max)


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
    if not _KEY_RE.match(key):
        raise BadRecord("bad_key", f"key {key!r} must be ASCII letters, digits, '-' or '_' (no dots)")
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
        raise BadRecord("non_finite", f"{name} contains NaN or Inf")
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
    info = dict(meta, schema_version=SCHEMA_VERSION, key=key, prompt=result.prompt, seed=int(result.seed),
                guidance_scale=float(result.guidance_scale), num_tokens=int(result.num_tokens),
                feature_steps=[int(s) for s in result.feature_steps], array_dtypes=dtypes, array_shapes=shapes)
    if image_scores is not None:
        info[IMAGE_SCORES] = image_scores
    sample[JSON] = json.dumps(info, sort_keys=True, ensure_ascii=True).encode("ascii")
    sample[TXT] = result.prompt.encode("utf-8")
    sample.update(encoded)
    if result.image is not None:
        sample[IMAGE] = png_bytes(result.image)
    return sample, {"fp32_fallback": fallback}


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_sample(sample: dict[str, bytes]) -> Record:
    """WebDataset sample dict (raw bytes per extension) -> Record. Raises BadRecord if malformed."""
    try:
        meta = json.loads(sample[JSON])
    except (KeyError, ValueError) as err:
        raise BadRecord("bad_json", f"sample {sample.get('__key__')!r}: {err}") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise BadRecord("schema_version", f"sample {sample.get('__key__')!r} has schema "
                        f"{meta.get('schema_version')!r}, this reader understands {SCHEMA_VERSION}")
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
        raise BadRecord("corrupt_member", f"sample {sample.get('__key__')!r}: {err}") from None
    return Record(key=sample.get("__key__", meta.get("key")), meta=meta, caption=caption, arrays=arrays,
                  feats=feats, image_png=sample.get(IMAGE))


def field_of(ext: str) -> str:
    """Group name of a member extension for size accounting (``feats.mid_block.npy`` -> ``feats``)."""
    return "feats" if ext.startswith(FEATS_PREFIX) else ext
