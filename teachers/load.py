"""Load a diffusion teacher: built-in offline specs, a local diffusers folder, or a hub id.

    teacher = load_teacher("tiny", dtype="float32", device="cpu")
    teacher.pipe        # a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline / StableDiffusion3Pipeline

Specs:
    tiny          SD-1.5-shaped pipeline from small configs (same weights on every machine)
    tiny-xl       SDXL-shaped: two text encoders, pooled embeddings, time ids
    shapes        SD-1.5-shaped, 32 px, trained here on the shapes world (``teachers/shapes``):
                  it draws what its captions say, so quality metrics mean something offline
    shapes-sd15   the same world with SD-1.5's UNet layout (three levels, two ResNet+transformer
                  pairs per stage) and scheduler, trained on the training split only
    shapes-sd3    the same world as SD3 shapes it: an MMDiT (SD3Transformer2DModel) over the shapes
                  autoencoder's latents, two CLIP text encoders with projection, no T5, the
                  FlowMatchEulerDiscreteScheduler (shift 1), trained with rectified flow on the
                  training split only (a flow teacher, StableDiffusion3Pipeline)
    sd15-random   the full SD-1.5 architecture, random weights (cost measurement)
    sdxl-random   the full SDXL base architecture, random weights (cost measurement)
    tiny-sd3      SD3-shaped: an MMDiT flow-matching transformer (SD3Transformer2DModel), the
                  FlowMatchEulerDiscreteScheduler with SD3's shift 3, two CLIP text encoders with
                  projection, no T5 (text_encoder_3=None, as diffusers allows), 16-channel KL-f8 VAE
    sd3-random    SD3-Medium's architecture (2B transformer, CLIP-L and bigG, no T5), random weights:
                  for cost only (about 11 GB in float32; build it on the meta device to count)
    PATH          a local diffusers pipeline folder (``model_index.json`` inside): SD 1.x/2.x, SDXL
                  or SD3 (``_class_name`` StableDiffusion3Pipeline; a T5 encoder is loaded if present)
    ORG/NAME      a hub id: loaded where a network exists; offline it fails within seconds

Every built-in uses the real CLIP BPE tokenizer made offline (``teachers.tokenizer``).

Flux does not fit this path without special cases, so it is refused (one line): FluxPipeline packs
2x2 latent patches into a token sequence in the pipeline (``_pack_latents``) with latent image ids,
its released models are guidance-distilled (the weight is a transformer input, not CFG's two
branches), its T5 encoder is required, and its shift is resolution-dependent. SD3 and SD3.5
pipelines (same class, ``dual_attention_layers`` and ``qk_norm`` in the transformer's config) fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
from urllib.parse import urlparse

BUILTIN_SPECS = ("tiny", "tiny-xl", "shapes", "shapes-sd15", "shapes-sd3", "sd15-random", "sdxl-random", "tiny-sd3",
                 "sd3-random")
SD3_SPECS = ("tiny-sd3", "shapes-sd3", "sd3-random")  # flow-matching transformer teachers (StableDiffusion3Pipeline)
SHAPES_ARCHS = {"shapes": "shapes", "shapes-sd15": "sd15", "shapes-sd3": "sd3"}  # trained here: spec -> teachers.shapes arch
DTYPES = ("float32", "float16", "bfloat16")
_BUILD_SEED = 20240601  # weights of built-in specs: fixed, so every machine builds the same model


class TeacherError(ValueError):
    """A teacher spec that cannot be loaded; the message says what to do instead."""


@dataclasses.dataclass
class Teacher:
    spec: str  # what the user asked for
    pipe: object  # diffusers StableDiffusionPipeline, StableDiffusionXLPipeline or StableDiffusion3Pipeline
    is_xl: bool  # SDXL-style conditioning (two text encoders, pooled embeds, time ids)
    dtype: str  # one of DTYPES
    device: str
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def is_flow(self) -> bool:
        """A rectified-flow transformer teacher (StableDiffusion3Pipeline): velocity outputs, no UNet."""
        return type(self.pipe).__name__.startswith("StableDiffusion3")

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def denoiser(self):
        """The network the sampler steps: the UNet, or an SD3 teacher's transformer."""
        return self.pipe.transformer if self.is_flow else self.pipe.unet

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        """Image side the denoiser was configured for (``sample_size`` latents x VAE factor)."""
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        """``epsilon`` / ``v_prediction`` (the scheduler's), or ``flow`` for a rectified-flow teacher:
        the velocity v = eps - x0 of z_t = (1 - sigma) x0 + sigma eps."""
        if self.is_flow:
            return FLOW_PREDICTION
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def check_resolution(self, height: int, width: int) -> None:
        """Raise ``ValueError`` naming the value if the denoiser cannot run at this image size."""
        multiple = resolution_multiple(self.pipe.vae.config, self.denoiser.config)
        limit = max_resolution(self.pipe.vae.config, self.denoiser.config)
        for name, side in (("height", height), ("width", width)):
            if side <= 0 or side % multiple:
                raise ValueError(f"{name}={side} is not possible for teacher {self.spec!r}: "
                                 f"image sides must be positive multiples of {multiple}")
            if limit is not None and side > limit:
                raise ValueError(f"{name}={side} is not possible for teacher {self.spec!r}: its transformer's "
                                 f"position table covers image sides up to {limit}")


FLOW_PREDICTION = "flow"  # prediction_type of rectified-flow teachers: the velocity eps - x0


def resolution_multiple(vae_config, unet_config) -> int:
    """Image sides must be multiples of this: the VAE factor times one halving per UNet down stage
    (for a transformer, times its patch size)."""
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if "patch_size" in unet_config:
        return vae_factor * int(unet_config["patch_size"])
    return vae_factor * 2 ** (len(unet_config["block_out_channels"]) - 1)


def max_resolution(vae_config, denoiser_config) -> int | None:
    """The largest image side an SD3 transformer's cropped position table covers (None: no limit)."""
    size = denoiser_config.get("pos_embed_max_size") if "patch_size" in denoiser_config else None
    if not size:
        return None
    return int(size) * int(denoiser_config["patch_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_teacher(spec: str, dtype: str = "float32", device: str = "cpu", *, local_files_only: bool | None = None) -> Teacher:
    """Build or load the teacher named by ``spec`` (see the module docstring)."""
    tdtype = torch_dtype(dtype)
    if spec in BUILTIN_SPECS:
        pipe = _build_builtin(spec) if spec not in SD3_SPECS else build_sd3(spec)
        is_xl = spec in ("tiny-xl", "sdxl-random")
    elif os.path.isdir(spec) and teacher_lineage(spec) is not None:
        pipe, is_xl = load_exported_student(spec, tdtype)
    elif os.path.isdir(spec):
        pipe, is_xl = _load_folder(spec, tdtype)
    elif _looks_like_hub_id(spec):
        pipe, is_xl = _load_hub(spec, tdtype, local_files_only)
    else:
        raise TeacherError(f"unknown teacher {spec!r}: expected one of {', '.join(BUILTIN_SPECS)}, "
                           "a local diffusers folder, or a hub id such as org/name")
    pipe.to(device)
    if spec in BUILTIN_SPECS and dtype != "float32":  # folders were loaded in that dtype already
        pipe.to(dtype=tdtype)
    pipe.set_progress_bar_config(disable=True)
    return Teacher(spec=spec, pipe=pipe, is_xl=is_xl, dtype=dtype, device=str(device))


# ------------------------------------------------------------------------------------------
# built-in specs
# ------------------------------------------------------------------------------------------


def _builtin_configs(spec: str) -> dict:
    """Configs of a built-in spec: ``unet``, ``vae``, ``text`` and, for SDXL shapes, ``text_2``."""
    from teachers import configs
    from teachers.shapes import model as shapes_model

    return {
        "tiny": lambda: dict(unet=configs.tiny_unet(), vae=configs.tiny_vae(), text=configs.tiny_text()),
        "tiny-xl": lambda: dict(unet=configs.tiny_xl_unet(), vae=configs.tiny_vae(), text=configs.tiny_text(),
                                text_2=configs.tiny_xl_text_2()),
        "shapes": lambda: shapes_model.configs_dict(),
        "shapes-sd15": lambda: shapes_model.configs_dict("sd15"),
        "shapes-sd3": lambda: shapes_model.configs_dict("sd3"),
        "sd15-random": lambda: dict(unet=configs.sd15_unet(), vae=configs.sd_vae(), text=configs.clip_l_text()),
        "sdxl-random": lambda: dict(unet=configs.sdxl_unet(), vae=configs.sd_vae(1024, 0.13025),
                                    text=configs.clip_l_text_xl(), text_2=configs.clip_bigg_text()),
        "tiny-sd3": lambda: dict(transformer=configs.tiny_sd3_transformer(), vae=configs.tiny_sd3_vae(),
                                 text=configs.tiny_text(), text_2=configs.tiny_xl_text_2(),
                                 scheduler=configs.sd3_scheduler()),
        "sd3-random": lambda: dict(transformer=configs.sd3_medium_transformer(), vae=configs.sd3_vae(),
                                   text=configs.sd3_clip_l_text(), text_2=configs.sd3_clip_g_text(),
                                   scheduler=configs.sd3_scheduler()),
    }[spec]()


def build_sd3(spec: str, device: str | None = None):
    """An SD3-shaped built-in as diffusers' own ``StableDiffusion3Pipeline``: ``SD3Transformer2DModel``,
    ``FlowMatchEulerDiscreteScheduler`` (SD3's shift), two ``CLIPTextModelWithProjection`` encoders with
    the real CLIP BPE tokenizers, no T5 (``text_encoder_3=None``), the 16-channel VAE. Seeded weights;
    ``shapes-sd3``'s are its trained ones (``teachers/shapes/weights_sd3``), on its 4-channel shapes
    autoencoder, with its tokenizers (16 CLIP tokens) and scheduler (``teachers.shapes.model``).

    ``device="meta"`` builds every module without memory or initialisation (shapes and parameter
    counts of ``sd3-random``'s 2B transformer in a second; such a pipeline cannot run)."""
    import contextlib

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from teachers.shapes import model as shapes_model
    from teachers.tokenizer import clip_tokenizer

    cfg = _builtin_configs(spec)
    place = torch.device(device) if device else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), place:  # building must not move the caller's global RNG
        torch.manual_seed(_BUILD_SEED)
        if spec in SHAPES_ARCHS:  # trained here: the committed weights replace the seeded init (none on meta)
            arch = SHAPES_ARCHS[spec]
            modules = shapes_model.build_modules(arch)
            if device != "meta":
                shapes_model.load_components(shapes_model.WEIGHTS_DIRS[arch], modules, arch)
            return shapes_model.sd3_pipeline(**modules)
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**cfg["transformer"]),
            vae=AutoencoderKL(**cfg["vae"]),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text"])),
            tokenizer=clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"])),
            tokenizer_2=clip_tokenizer(pad_token="!"),  # OpenCLIP bigG pads with "!", as in SDXL
            text_encoder_3=None, tokenizer_3=None,
            scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        )


def _build_builtin(spec: str):
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from teachers import configs
    from teachers.shapes import model as shapes_model
    from teachers.tokenizer import clip_tokenizer

    # fork_rng: building a teacher must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_BUILD_SEED)
        cfg = _builtin_configs(spec)
        components = dict(
            unet=UNet2DConditionModel(**cfg["unet"]),
            vae=AutoencoderKL(**cfg["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text"])),
            tokenizer=clip_tokenizer(),
            scheduler=DDIMScheduler(**(shapes_model.scheduler_config(SHAPES_ARCHS[spec]) if spec in SHAPES_ARCHS else
                                       dict(configs.sd15_scheduler(), clip_sample=False, set_alpha_to_one=False))),
        )
        if spec in SHAPES_ARCHS:  # trained here: the committed weights replace the seeded init
            arch = SHAPES_ARCHS[spec]
            shapes_model.load_weights(shapes_model.WEIGHTS_DIRS[arch], components["unet"], components["vae"],
                                      components["text_encoder"], arch)
        if "text_2" not in cfg:
            return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"]))
        components["tokenizer_2"] = clip_tokenizer(pad_token="!")
        return StableDiffusionXLPipeline(**components)


# ------------------------------------------------------------------------------------------
# local folders and hub ids
# ------------------------------------------------------------------------------------------


def _pipeline_class(class_name: str):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if class_name.startswith("StableDiffusion3"):  # SD3 and SD3.5 share the class
        return StableDiffusion3Pipeline, False
    if class_name.startswith("Flux"):
        raise TeacherError(f"pipeline class {class_name!r}: Flux teachers are not supported (packed latent tokens, "
                           "guidance as a transformer input instead of CFG, T5 required); SD3/SD3.5 folders are")
    if "XL" in class_name:
        return StableDiffusionXLPipeline, True
    if class_name.startswith("StableDiffusion"):
        return StableDiffusionPipeline, False
    raise TeacherError(f"pipeline class {class_name!r} is not a Stable Diffusion (1.x/2.x/XL/3) text-to-image pipeline")


SD3_OPTIONAL = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")  # None where a folder lacks them


def _load_folder(path: str, tdtype):
    cls, is_xl = _folder_class(path)
    kwargs = dict(safety_checker=None, requires_safety_checker=False) if cls.__name__ == "StableDiffusionPipeline" else {}
    if cls.__name__ == "StableDiffusion3Pipeline":  # no T5 (diffusers saves none for text_encoder_3=None): None
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
        kwargs = {name: None for name in SD3_OPTIONAL if not any(index.get(name) or [None])}
    return cls.from_pretrained(path, dtype=tdtype, **kwargs), is_xl


STUDENT_INFERENCE_FILE = "inference.json"  # written by ``distill export`` next to model_index.json


def teacher_lineage(spec: str) -> dict | None:
    """For a folder written by ``distill export``: ``{"folder", "inference"}`` (its path and its
    ``inference.json``: step count, timesteps, its own teacher, recipe, checkpoint), for a dump to
    record which distilled student it came from. None for any other spec."""
    path = os.path.join(spec, STUDENT_INFERENCE_FILE)
    if not (os.path.isdir(spec) and os.path.isfile(path) and os.path.isfile(os.path.join(spec, "model_index.json"))):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            inference = json.load(f)
    except ValueError as err:
        raise TeacherError(f"exported student {spec!r}: {STUDENT_INFERENCE_FILE} does not parse ({err})") from None
    return {"folder": os.path.abspath(spec), "inference": inference}


def load_exported_student(path: str, tdtype):
    """An exported student folder as a teacher pipeline (SnapFusion's chain: a distilled student
    teaches the next stage). Its UNet class is the folder's own ``unet/student_unet.py``, which
    diffusers runs only with ``trust_remote_code``: this loads it for folders that ``distill export``
    wrote (``inference.json`` beside ``model_index.json``), which the user names as the teacher."""
    from diffusers import DiffusionPipeline

    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        _, is_xl = _pipeline_class(json.load(f).get("_class_name", ""))
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=tdtype, trust_remote_code=True)
    except (OSError, ValueError) as err:
        raise TeacherError(f"exported student {path!r} does not load as a pipeline ({type(err).__name__}: {err})") from None
    return pipe, is_xl


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """True if the hub endpoint accepts a TCP connection within ``timeout_s`` (DNS included)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo has no timeout of its own: probe in a daemon thread and stop waiting after timeout_s.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def resolve_teacher(spec: str, local_files_only: bool | None = None) -> str:
    """What ``load_teacher(spec)`` would load, found without loading any weights: the spec itself for
    a built-in, the folder for a local pipeline folder (its ``model_index.json`` checked) and, for a
    hub id, the folder of its snapshot (from the local hub cache, else configs only downloaded).

    ``TeacherError`` (a ``ValueError``: one line saying what to do) when it cannot be resolved: an
    unknown spec, a folder that is not a Stable Diffusion pipeline, a hub id neither cached nor
    reachable (``local_files_only``, ``HF_HUB_OFFLINE`` or no network) or unknown to the hub. For a
    job's launcher, so a bad teacher fails before any state is written.
    """
    if spec in BUILTIN_SPECS:
        return spec
    if os.path.isdir(spec):
        _folder_class(spec)
        return spec
    if not _looks_like_hub_id(spec):
        raise TeacherError(f"unknown teacher {spec!r}: expected one of {', '.join(BUILTIN_SPECS)}, "
                           "a local diffusers folder, or a hub id such as org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hint = (f"download it where a network exists (`huggingface-cli download {spec} --local-dir DIR`) "
            "and pass that folder as the teacher spec")
    try:  # a copy already in the local hub cache needs no network
        return snapshot_download(spec, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if local_files_only or not _hub_reachable():
        raise TeacherError(f"teacher {spec!r} is not in the local hub cache and the hub cannot be reached "
                           f"(HF_HUB_OFFLINE set or no network): {hint}")
    try:  # configs only: enough to check the id and the teacher's shapes, no weights
        return snapshot_download(spec, allow_patterns=["model_index.json", "*/config.json"])
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear message
        raise TeacherError(f"teacher {spec!r} could not be found on the hub ({type(err).__name__}: {err}); {hint}") from None


def _folder_class(path: str) -> tuple[type, bool]:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise TeacherError(f"teacher folder {path!r} has no model_index.json: not a diffusers pipeline folder")
    try:
        with open(index, encoding="utf-8") as f:
            class_name = json.load(f).get("_class_name", "")
    except (OSError, ValueError, AttributeError) as err:
        raise TeacherError(f"teacher folder {path!r}: model_index.json is unreadable ({err})") from None
    return _pipeline_class(class_name)


def _load_hub(repo_id: str, tdtype, local_files_only: bool | None):
    from huggingface_hub import snapshot_download

    folder = resolve_teacher(repo_id, local_files_only)
    if not os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")) and \
            not os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors")):
        try:  # resolved from configs only (or a partial cache): fetch the weights now
            folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                                       local_files_only=bool(local_files_only))
        except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear message
            raise TeacherError(f"teacher {repo_id!r} could not be downloaded ({type(err).__name__}: {err})") from None
    return _load_folder(folder, tdtype)


def teacher_geometry(spec: str) -> dict | None:
    """Shapes of a teacher without loading weights: ``{levels, resolution, multiple, is_xl}``; an SD3
    (flow) teacher adds ``is_flow`` True, ``blocks`` (its joint transformer blocks; ``levels`` is None)
    and ``max_resolution`` (the image side its position table covers).

    For validating a job's arguments before any worker starts. None for a hub id (unknown offline).
    Raises TeacherError for a spec that is neither built-in, a pipeline folder nor a hub id.
    """
    if spec in BUILTIN_SPECS:
        cfg = _builtin_configs(spec)
        unet, vae, is_xl = cfg.get("unet", cfg.get("transformer")), cfg["vae"], "unet" in cfg and "text_2" in cfg
    elif os.path.isdir(spec):
        is_flow = _folder_class(spec)[0].__name__ == "StableDiffusion3Pipeline"
        try:
            with open(os.path.join(spec, "transformer" if is_flow else "unet", "config.json"), encoding="utf-8") as f:
                unet = json.load(f)
            with open(os.path.join(spec, "vae", "config.json"), encoding="utf-8") as f:
                vae = json.load(f)
        except (OSError, ValueError) as err:
            raise TeacherError(f"teacher folder {spec!r} is not a diffusers pipeline folder ({err})") from None
        is_xl = unet.get("addition_embed_type") == "text_time"
    elif _looks_like_hub_id(spec):
        return None
    else:
        raise TeacherError(f"unknown teacher {spec!r}: expected one of {', '.join(BUILTIN_SPECS)}, "
                           "a local diffusers folder, or a hub id such as org/name")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    geometry = dict(resolution=int(unet["sample_size"]) * factor, multiple=resolution_multiple(vae, unet), is_xl=is_xl)
    if "patch_size" not in unet:
        return dict(levels=len(unet["block_out_channels"]), **geometry)
    return dict(levels=None, **geometry, is_flow=True, blocks=int(unet["num_layers"]),
                max_resolution=max_resolution(vae, unet))
