"""Evaluate a student against its teacher: FID, CLIP score, latency and sample grids per step count.

    distill eval --student out/student --captions annotations/captions_val2014.json --references val2014/ \\
        --num_images 30000 --teacher_steps 50,8,4,1 --student_steps 8,4 \\
        --clip_model ViT-L-14 --clip_weights /models/open_clip_vit_l14.bin \\
        --inception_weights /models/weights-inception-2015-12-05-6726825d.pth --output out/eval
    distill eval --student runs/s1 --captions prompts.txt --clip_model ViT-L-14 --clip_weights ... --output out/eval

The MS-COCO protocol (SnapFusion: 5K of COCO 2017; BK-SDM: 30K at 256 px): from a captions annotation
file (``captions_val2014.json`` / ``captions_val2017.json``) take the first ``--num_images`` images by
id, one caption each (deterministically: the one with the lowest annotation id), generate one image
per caption (seed = ``--seed`` + index, the same noise for every model and step count), and compare
with those images from ``--references`` (resized on the short side and center-cropped to the
generated size). FID is torchmetrics' ``FrechetInceptionDistance`` (torch-fidelity's Inception, local weights);
CLIP score the mean image-caption cosine under an open_clip model (``students.evaluation.metrics``). A plain
captions file (``.txt`` or ``.jsonl``) and reference-free runs (CLIP score only) work too. For the ``shapes``
teacher (or a student of it), ``--metrics adherence,frechet_analyser`` are its offline stand-ins (the committed
analyser: ``teachers.shapes.analyser``); ``METRICS`` is the registry of names.

``--student`` is a folder made by ``distill export`` or a training checkpoint / run folder; the teacher
defaults to the one it was distilled from. Flow teachers and students (SD3's pipeline: ``--teacher tiny-sd3``, an
exported flow student with its UNet in the transformer seat, or its run) work the same way; their per-call latency
is the transformer seat's, ``denoiser_latency_s``, on SD3's transformer call, in place of ``unet_latency_s``.
Outputs in ``--output``: ``metrics.json``, ``report.html`` (FID and CLIP score vs steps, table, grid) and
``grid.png``. From Python: ``evaluate(EvalConfig(...))``
returns what ``metrics.json`` holds; ``extra_metrics`` takes objects of ``students.evaluation.metrics.Metric``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time

from core.devices import check_device
from core.errors import UserError, run_main
from core.fs import check_output_folder
from core.options import option, parse

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


_S_IO = "inputs and output"
_S_GENERATION = "generation"
_S_METRICS = "metrics"
_S_DEVICE = "device"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    output: str = option(section=_S_IO, help="folder for metrics.json, report.html, grid.png")
    captions: str = option(section=_S_IO,
                           help="COCO captions annotation JSON, or a .txt (one per line) / .jsonl (\"caption\" or \"text\") prompt file")
    student: str | None = option(None, section=_S_IO,
                                 help="exported pipeline folder, checkpoint folder or training run folder; None = teacher only")
    teacher: str | None = option(None, section=_S_IO,
                                 help="teacher spec (teachers.load); None = the one the student was distilled from")
    num_images: int = option(5000, section=_S_GENERATION,
                             help="captions (= generated images per model and step count); COCO: first N images by id")
    references: str | None = option(None, section=_S_IO,
                                    help="folder of reference images (COCO: the val images, by \"file_name\"); needed for FID")
    teacher_steps: tuple[int, ...] = option((50, 8, 4, 1), section=_S_GENERATION,
                                            help="teacher step counts; () = no teacher rows")
    student_steps: tuple[int, ...] = option((), section=_S_GENERATION,
                                            help="student step counts; () = the student's own (inference.json)")
    guidance_scale: float | None = option(None, section=_S_GENERATION,
                                          help="CFG weight for every model; None = the student's recorded one, else 7.5")
    resolution: int | None = option(None, section=_S_GENERATION,
                                    help="image side in pixels; None = the student's recorded size, else the teacher's native")
    metrics: tuple[str, ...] | None = option(None, section=_S_METRICS,
                                             help="names from METRICS: clip, fid, and for the shapes teacher adherence, "
                                             "frechet_analyser; None = clip if --clip_weights, fid if --references")
    clip_model: str = option("ViT-L-14", section=_S_METRICS, help="open_clip architecture for the CLIP score")
    clip_weights: str | None = option(None, section=_S_METRICS,
                                      help="local open_clip checkpoint, or \"random\" (tests)")
    inception_weights: str | None = option(None, section=_S_METRICS,
                                           help="local torch-fidelity Inception-v3 state dict (.pth); needed for FID")
    fid_features: int = option(2048, section=_S_METRICS,
                               help="Inception tap (64, 192, 768, 2048); 2048 is the standard FID")
    weights: str = option("ema", section=_S_GENERATION,
                          help="ema | raw: which student weights, when --student is a checkpoint", choices=("ema", "raw"))
    batch_size: int = option(8, section=_S_GENERATION, help="prompts per pipeline call")
    seed: int = option(0, section=_S_GENERATION, help="image i uses torch.Generator().manual_seed(seed + i)")
    grid_images: int = option(4, section=_S_METRICS, help="first K prompts shown in the grid (0 = no grid)")
    latency_repeats: int = option(3, section=_S_METRICS,
                                  help="timed single-image generations per configuration after one warm-up (0 = skip)")
    device: str = option("cpu", section=_S_DEVICE, help="cpu | cuda | cuda:N")
    dtype: str = option("float32", section=_S_DEVICE,
                        help="weights and activations dtype", choices=("float32", "float16", "bfloat16"))


# ------------------------------------------------------------------------------------------
# prompts and references (the COCO protocol)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    caption: str
    image_id: int | None = None  # COCO image id
    file_name: str | None = None  # COCO image file (reference for FID)


def coco_prompts(path: str, num_images: int) -> list[Prompt]:
    """First ``num_images`` images by id, each with its caption of lowest annotation id (file order if no ids)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path!r} is not a COCO captions annotation file: expected an object with lists "
                         "'images' ([{id, file_name}]) and 'annotations' ([{image_id, caption}])")
    best: dict[int, tuple] = {}
    for order, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{path!r}: annotation #{order} has no image_id/caption string: {str(ann)[:120]}")
        caption = " ".join(ann["caption"].split())
        if not caption:
            continue
        rank = (ann.get("id", order), order)
        if ann["image_id"] not in best or rank < best[ann["image_id"]][0]:
            best[ann["image_id"]] = (rank, caption)
    images = []
    for order, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{path!r}: image #{order} has no id/file_name: {str(image)[:120]}")
        images.append(image)
    prompts = [Prompt(best[im["id"]][1], im["id"], im["file_name"]) for im in sorted(images, key=lambda im: im["id"])
               if im["id"] in best]
    if len(prompts) < num_images:
        raise ValueError(f"{path!r} has {len(prompts)} captioned images, fewer than --num_images {num_images}")
    return prompts[:num_images]


def plain_prompts(path: str, num_images: int) -> list[Prompt]:
    """A ``.txt`` file (one caption per line) or ``.jsonl`` (``caption`` or ``text`` per line); blank lines skipped."""
    captions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                row = json.loads(line)
                text = row.get("caption", row.get("text")) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path!r} line {n}: expected an object with a 'caption' or 'text' string")
                line = text
            captions.append(" ".join(line.split()))
    if len(captions) < num_images:
        raise ValueError(f"{path!r} has {len(captions)} captions, fewer than --num_images {num_images}")
    return [Prompt(c) for c in captions[:num_images]]


def load_prompts(path: str, num_images: int) -> tuple[list[Prompt], str]:
    """(prompts, "coco" | "plain") from a COCO annotation ``.json`` or a ``.txt``/``.jsonl`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file {path!r} not found")
    if not path.endswith((".json", ".txt", ".jsonl")):
        raise ValueError(f"captions file {path!r}: expected a COCO annotation .json, a .txt or a .jsonl")
    try:
        if path.endswith(".json"):
            return coco_prompts(path, num_images), "coco"
        return plain_prompts(path, num_images), "plain"
    except UnicodeDecodeError as err:
        raise ValueError(f"--captions {path!r} is not UTF-8 text (byte {err.start}: {err.reason}); "
                         "save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--captions {path!r} is not valid JSON{' Lines' if path.endswith('.jsonl') else ''} "
                         f"(line {err.lineno}: {err.msg})") from None


def reference_paths(prompts: list[Prompt], folder: str) -> list[str]:
    """COCO: the prompts' own images (all must exist); plain captions: every image in the folder, sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"references folder {folder!r} not found")
    if prompts and prompts[0].file_name is not None:
        paths = [os.path.join(folder, p.file_name) for p in prompts]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(paths)} reference images missing in {folder!r}, "
                                    f"first {missing[0]!r}")
        return paths
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if len(paths) < 2:
        raise ValueError(f"references folder {folder!r} has {len(paths)} images; FID needs at least 2")
    return paths


def load_reference(path: str, size: int):
    """Image -> (3, size, size) float in [0, 1]: short side resized (bicubic), then center-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


def student_kind(path: str) -> str:
    """"export" (a diffusers folder) or "checkpoint" (a checkpoint or run folder); ValueError otherwise."""
    from students.training.runs import resolve_checkpoint

    if os.path.isfile(os.path.join(path, "model_index.json")):
        return "export"
    resolve_checkpoint(path)  # raises naming the path
    return "checkpoint"


FLOW_ABSENT = ("text_encoder_3", "tokenizer_3")  # SD3's T5, left out of flow students' folders


def absent_components(path: str) -> dict:
    """``from_pretrained`` keywords for an exported folder's left-out components: an SD3-shaped folder (a flow
    student's, ``StableDiffusion3Pipeline``) without T5 loads only when told ``text_encoder_3=None,
    tokenizer_3=None`` (its ``inference.json``'s ``load_kwargs``); {} for every other folder."""
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    if not str(index.get("_class_name", "")).startswith("StableDiffusion3"):
        return {}
    return {name: None for name in FLOW_ABSENT if index.get(name, [None, None]) == [None, None]}


def load_student(cfg: EvalConfig, teacher=None):
    """(pipeline, inference info) of ``cfg.student``; ``teacher`` (loaded) is reused for checkpoints."""
    import torch
    from diffusers import DiffusionPipeline

    from students.export import folder as export
    from students.training import runs as student_runs

    if student_kind(cfg.student) == "export":
        pipe = DiffusionPipeline.from_pretrained(cfg.student, trust_remote_code=True, **absent_components(cfg.student))
        pipe.to(cfg.device)
        if cfg.dtype != "float32":
            pipe.to(dtype=getattr(torch, cfg.dtype))
        pipe.set_progress_bar_config(disable=True)
        return pipe, export.read_inference(cfg.student)
    run = student_runs.read_run(cfg.student)
    if teacher is not None and teacher.spec != run.teacher:
        teacher = None  # another teacher: the student keeps the text encoder it was distilled with
    return export.assemble_pipeline(run, weights=cfg.weights, device=cfg.device, dtype=cfg.dtype, teacher=teacher)


def student_info(cfg: EvalConfig) -> dict:
    """What the student records without loading it: inference.json, or the checkpoint's run."""
    from students.export import folder as export
    from students.training import runs as student_runs
    from students.distill import inference as student_inference

    if not cfg.student:
        return {}
    if student_kind(cfg.student) == "export":
        return export.read_inference(cfg.student)
    run = student_runs.read_run(cfg.student)
    _, info = student_inference.student_scheduler(run.dataset, run.recipe)
    size = run.dataset.dump_recipe.sampler.height
    return dict(info, teacher=run.teacher, guidance_scale=student_inference.guidance_for(run.dataset), height=size, width=size)


# ------------------------------------------------------------------------------------------
# generation, latency
# ------------------------------------------------------------------------------------------


def generate(pipe, prompts: list[Prompt], steps: int, guidance: float, size: int, seed: int, batch_size: int, bar=None):
    """Yield (images (B, 3, H, W) float in [0, 1], captions, seconds spent in the pipeline) batch by batch."""
    import torch

    for start in range(0, len(prompts), batch_size):
        captions = [p.caption for p in prompts[start:start + batch_size]]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(captions))]
        t0 = time.perf_counter()
        with torch.inference_mode():
            images = pipe(captions, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                          generator=gens, output_type="pt").images
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.update(len(captions))
        yield images.float().cpu(), captions, seconds


def denoiser(pipe) -> tuple[str, object]:
    """(latency key, network) of the model a pipeline steps: a UNet pipeline's ``unet`` (``unet_latency_s``), or
    an SD3-shaped (flow) pipeline's ``transformer`` seat (``denoiser_latency_s``): a flow teacher's
    ``SD3Transformer2DModel`` or a flow student's ``FlowUNetTransformer`` (``students/models/flow_student.py``)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        return "denoiser_latency_s", transformer
    return "unet_latency_s", pipe.unet


def latency(pipe, steps: int, guidance: float, size: int, repeats: int, device: str) -> dict:
    """Median seconds of one end-to-end image (text encoder, ``steps`` denoiser calls with CFG, decoder) and of
    one denoiser forward on the CFG pair, timed like ``students.cost.profile`` (its inputs and forward; after a
    warm-up). The UNet gets profile's UNet call; SD3's transformer seat its own call, at the shapes the pipeline
    gives it: ``hidden_states`` (latents, SD3's VAE factor 8), ``timestep`` (sigma * 1000), ``encoder_hidden_states``
    (CLIP's 77 + T5's 256 prompt tokens, zeros without T5) and ``pooled_projections``."""
    import torch

    from students.cost import profile

    key, net = denoiser(pipe)
    if repeats <= 0:
        return {"latency_s": None, key: None}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    dtype = str(net.dtype).replace("torch.", "")
    # make_inputs/forward read shapes off the network's config; a name in profile's tables selects the call:
    # any UNet name the UNet's, "sd3" the transformer's (a flow student's wrapper answers the same call)
    name = "sd3" if key == "denoiser_latency_s" else "sd15"
    args, kwargs = profile.make_inputs(name, net, 2, size, device, dtype)
    ends, calls = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            pipe("a photograph", num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                 generator=torch.Generator("cpu").manual_seed(i), output_type="pt")
            sync()
            t1 = time.perf_counter()
            profile.forward(name, net, args, kwargs)
            sync()
            if i:  # the first round warms up
                ends.append(t1 - t0)
                calls.append(time.perf_counter() - t1)
    return {"latency_s": statistics.median(ends), key: statistics.median(calls)}


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MetricEntry:
    """A metric ``--metrics`` can name: ``build(cfg, shared)`` makes it (``shared``: models loaded once
    for every metric of the run, such as the shapes analyser), ``check(cfg)`` names a missing flag or file
    before any work, and ``world``, if set, is the teacher whose images it can read (``shapes``)."""

    build: object
    check: object = None
    world: str | None = None


def _check_clip(cfg: EvalConfig) -> None:
    from filters.clip_embed import RANDOM_WEIGHTS, model_embed_dim

    if cfg.clip_weights is None:
        raise ValueError(f"the CLIP score needs --clip_weights (a local {cfg.clip_model} checkpoint, or 'random')")
    if cfg.clip_weights != RANDOM_WEIGHTS and not os.path.isfile(cfg.clip_weights):
        raise FileNotFoundError(f"CLIP weights {cfg.clip_weights!r} not found (nothing is downloaded here)")
    model_embed_dim(cfg.clip_model)  # names an unknown architecture


def _check_fid(cfg: EvalConfig) -> None:
    from students.evaluation.metrics import FID_FEATURES

    if not cfg.inception_weights:
        raise ValueError("FID needs --inception_weights: a local torch-fidelity Inception-v3 state dict "
                         "(weights-inception-2015-12-05-6726825d.pth); nothing is downloaded here")
    if not os.path.isfile(cfg.inception_weights):
        raise FileNotFoundError(f"Inception weights {cfg.inception_weights!r} not found")
    if cfg.fid_features not in FID_FEATURES:
        raise ValueError(f"fid_features={cfg.fid_features} is not one of {FID_FEATURES}")
    if cfg.num_images < 2:
        raise ValueError(f"FID needs at least 2 images, got --num_images {cfg.num_images}")


def _check_frechet_analyser(cfg: EvalConfig) -> None:
    if cfg.num_images < 2:
        raise ValueError(f"frechet_analyser needs at least 2 images, got --num_images {cfg.num_images}")


def _analyser(shared: dict):
    """The committed shapes analyser (``teachers/shapes/weights``), loaded once for every metric that reads it."""
    if "analyser" not in shared:
        from teachers.shapes.analyser import load_analyser

        shared["analyser"] = load_analyser()
    return shared["analyser"]


def _clip(cfg, shared):
    from students.evaluation.metrics import ClipScore

    return ClipScore.load(cfg.clip_model, cfg.clip_weights, cfg.device)


def _fid(cfg, shared):
    from students.evaluation.metrics import InceptionFID

    return InceptionFID(cfg.inception_weights, cfg.fid_features, cfg.device)


def _adherence(cfg, shared):
    from teachers.shapes.analyser import Adherence

    return Adherence(_analyser(shared))


def _frechet_analyser(cfg, shared):
    from teachers.shapes.analyser import AnalyserFrechet

    return AnalyserFrechet(_analyser(shared))


#: the metrics ``--metrics`` names; from Python, ``extra_metrics`` takes any other Metric object
METRICS = {
    "clip": MetricEntry(_clip, _check_clip),  # CLIP score (open_clip)
    "fid": MetricEntry(_fid, _check_fid),  # FID (torch-fidelity's Inception)
    "adherence": MetricEntry(_adherence, world="shapes"),  # the shapes analyser's prompt adherence (offline CLIP score)
    "frechet_analyser": MetricEntry(_frechet_analyser, _check_frechet_analyser, world="shapes"),  # (offline FID)
}
KNOWN_METRICS = tuple(METRICS)


def build_metrics(cfg: EvalConfig) -> list:
    """The ``--metrics`` objects, in the order named (``METRICS``)."""
    shared: dict = {}
    return [METRICS[name].build(cfg, shared) for name in resolve_metrics(cfg)]


def teacher_world(spec: str | None) -> str | None:
    """``shapes`` for the shapes teacher or a student exported from it (however many distillations
    deep: ``teachers.load.teacher_lineage``); None otherwise."""
    from teachers.load import teacher_lineage

    for _ in range(16):  # a lineage is a chain of exports; the bound only guards a folder naming itself
        if spec == "shapes":
            return "shapes"
        lineage = teacher_lineage(spec) if spec and os.path.isdir(spec) else None
        if lineage is None:
            return None
        spec = lineage["inference"].get("teacher")
    return None


def resolve_metrics(cfg: EvalConfig) -> tuple[str, ...]:
    if cfg.metrics is not None:
        return tuple(cfg.metrics)
    return tuple(n for n, on in (("clip", cfg.clip_weights is not None), ("fid", cfg.references is not None)) if on)


def validate(cfg: EvalConfig, extra_metrics=()) -> dict:
    """Check everything that can be checked before work; returns the plan (prompts, references, ...).
    Raises ValueError / FileNotFoundError naming the bad value."""
    from students.evaluation.metrics import Metric
    from teachers.load import DTYPES, teacher_geometry

    if cfg.num_images < 1 or cfg.batch_size < 1 or cfg.grid_images < 0 or cfg.latency_repeats < 0:
        raise ValueError(f"num_images={cfg.num_images}, batch_size={cfg.batch_size} must be >= 1 and "
                         f"grid_images={cfg.grid_images}, latency_repeats={cfg.latency_repeats} >= 0")
    bad_steps = [s for s in cfg.teacher_steps + cfg.student_steps if s < 1]
    if bad_steps:
        raise ValueError(f"step counts must be >= 1, got {bad_steps}")
    if cfg.dtype not in DTYPES or cfg.weights not in ("ema", "raw"):
        raise ValueError(f"dtype={cfg.dtype!r} (one of {DTYPES}) / weights={cfg.weights!r} (ema | raw)")
    if cfg.guidance_scale is not None and not 0 <= cfg.guidance_scale < math.inf:  # nan would turn CFG off silently
        raise ValueError(f"--guidance_scale {cfg.guidance_scale} must be a finite number >= 0")
    check_device(cfg.device)
    check_output_folder(cfg.output, "--output", own="metrics.json")
    names = resolve_metrics(cfg)
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(KNOWN_METRICS)}")
    for m in extra_metrics:
        if not isinstance(m, Metric):
            raise TypeError(f"{m!r} is not a students.evaluation.metrics.Metric (name, reset, update, compute)")
    for name in names:
        if METRICS[name].check is not None:
            METRICS[name].check(cfg)
    needs_refs = "fid" in names or any(hasattr(m, "update_reference") for m in extra_metrics)
    if needs_refs and not cfg.references:
        raise ValueError("FID (and any reference metric) needs --references: a folder of reference images")
    prompts, source = load_prompts(cfg.captions, cfg.num_images)
    refs = reference_paths(prompts, cfg.references) if cfg.references else []
    info = student_info(cfg)
    if cfg.student and not cfg.student_steps and "num_inference_steps" not in info:
        raise ValueError(f"{cfg.student!r} records no step count (not made by distill export?): pass --student_steps")
    teacher = cfg.teacher or info.get("teacher")
    if cfg.teacher_steps and not teacher:
        raise ValueError("no teacher to evaluate: pass --teacher (or --student, whose teacher is the default)")
    if not cfg.teacher_steps and not cfg.student:
        raise ValueError("nothing to evaluate: give --student and/or --teacher_steps")
    geometry = teacher_geometry(teacher) if teacher else None  # raises TeacherError for an unknown spec
    world = teacher_world(teacher)
    for name in names:
        needs = METRICS[name].world
        if needs and world != needs:
            raise ValueError(f"--metrics {name} reads images of the {needs} world with its analyser: it needs the "
                             f"{needs} teacher (or a student of it), not teacher {teacher!r}")
    if world == "shapes" and any(METRICS[n].world == "shapes" for n in names):
        from teachers.shapes import world as shapes_world

        outside = [p.caption for p in prompts if shapes_world.parse_caption(p.caption) is None]
        if outside:
            raise ValueError(f"--metrics {','.join(n for n in names if METRICS[n].world)}: {len(outside)} caption(s) of "
                             f"{cfg.captions!r} are not in the shapes world's grammar, first {outside[0]!r}")
    size = cfg.resolution or info.get("height") or (geometry or {}).get("resolution")
    if not size:
        raise ValueError("cannot tell the image size (hub teacher without --student): pass --resolution")
    if geometry and size % geometry["multiple"]:
        raise ValueError(f"resolution {size} is not a multiple of {geometry['multiple']} for teacher {teacher!r}")
    limit = (geometry or {}).get("max_resolution")  # a flow teacher's transformer: its position table's reach
    if cfg.teacher_steps and limit and size > limit:
        raise ValueError(f"resolution {size} is over {limit} px, the largest image side flow teacher {teacher!r}'s "
                         f"transformer position table covers: pass --resolution {limit} or less")
    return dict(prompts=prompts, source=source, references=refs, info=info, teacher=teacher, size=int(size),
                guidance=cfg.guidance_scale if cfg.guidance_scale is not None else info.get("guidance_scale", 7.5),
                student_steps=cfg.student_steps or ((int(info["num_inference_steps"]),) if cfg.student else ()))


def _feed_references(metrics, paths: list[str], size: int, batch_size: int, progress: bool) -> list[str]:
    """Reference images into every metric with ``update_reference``; returns unreadable files (skipped, counted)."""
    import torch
    from tqdm import tqdm

    users = [m for m in metrics if hasattr(m, "update_reference")]
    skipped, batch = [], []
    if not users:
        return skipped

    def flush():
        images = torch.stack(batch)
        for m in users:
            m.update_reference(images)
        batch.clear()

    for path in tqdm(paths, desc="references", unit="img", disable=not progress):
        try:
            batch.append(load_reference(path, size))
        except OSError as err:  # a broken reference image is counted and reported, not fatal
            skipped.append(f"{path}: {err}")
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return skipped


def run_configuration(pipe, metrics, plan: dict, cfg: EvalConfig, label: str, steps: int):
    """Metrics, latency and throughput of one model at one step count; returns (row, grid images (K, H, W, 3) uint8)."""
    import numpy as np
    from tqdm import tqdm

    speed = latency(pipe, steps, plan["guidance"], plan["size"], cfg.latency_repeats, cfg.device)  # warms up, too
    for m in metrics:
        m.reset()
    prompts, seconds, grid = plan["prompts"], 0.0, []
    with tqdm(total=len(prompts), desc=f"{label} {steps} steps", unit="img", disable=not plan["progress"]) as bar:
        for images, captions, took in generate(pipe, prompts, steps, plan["guidance"], plan["size"], cfg.seed,
                                               cfg.batch_size, bar):
            seconds += took
            for m in metrics:
                m.update(images, captions)
            if len(grid) < cfg.grid_images:
                grid += list((images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))[: cfg.grid_images - len(grid)]
    scores = {}
    for m in metrics:
        scores.update(m.compute())
    row = {**scores, **speed, "images_per_s": len(prompts) / seconds, "num_images": len(prompts)}
    return row, (np.stack(grid) if grid else None)


def evaluate(cfg: EvalConfig, extra_metrics=(), progress: bool = True) -> dict:
    """Run the evaluation; writes metrics.json, report.html and grid.png into ``cfg.output`` and returns
    the metrics dict: ``results[model][steps] = {fid, clip_score, ..., latency_s, unet_latency_s, images_per_s}``
    (a flow teacher or student, SD3's pipeline: ``denoiser_latency_s``, its transformer seat's call, in place of
    ``unet_latency_s``; ``protocol["denoisers"]`` names each model's network).
    ``extra_metrics``: more ``students.evaluation.metrics.Metric`` objects, run beside ``cfg.metrics``."""
    from students.evaluation.report import write_report
    from students.training.grid import grid_png
    from teachers.load import load_teacher

    # 1. everything checkable, before any work
    plan = dict(validate(cfg, extra_metrics), progress=progress)
    os.makedirs(cfg.output, exist_ok=True)
    # 2. metrics, and the reference set into those that compare against one
    metrics = build_metrics(cfg) + list(extra_metrics)
    skipped = _feed_references(metrics, plan["references"], plan["size"], cfg.batch_size, progress)
    # 3. models: the teacher (when it has rows) and the student (an export, or assembled from a checkpoint)
    teacher = load_teacher(plan["teacher"], dtype=cfg.dtype, device=cfg.device) if cfg.teacher_steps else None
    runs = [("teacher", teacher.pipe if teacher else None, s) for s in cfg.teacher_steps]
    student = plan["info"]
    if cfg.student:
        student_pipe, student = load_student(cfg, teacher)
        runs += [("student", student_pipe, s) for s in plan["student_steps"]]
    # 4. every (model, step count): the same captions and seeds
    results: dict[str, dict[str, dict]] = {}
    rows, labels = [], []
    for label, pipe, steps in runs:
        results.setdefault(label, {})[str(steps)], grid = run_configuration(pipe, metrics, plan, cfg, label, steps)
        if grid is not None:
            rows.append(grid)
            labels.append(f"{label} {steps} st")
    # 5. outputs
    grid_path, grid_captions = None, [p.caption for p in plan["prompts"][:len(rows[0]) if rows else 0]]
    if rows:
        grid_path = os.path.join(cfg.output, "grid.png")
        grid_png(rows, grid_path, labels, captions=grid_captions)
    coco = plan["source"] == "coco"
    payload = {
        "config": dataclasses.asdict(cfg),
        "protocol": {"captions": cfg.captions, "format": plan["source"], "num_images": len(plan["prompts"]),
                     "caption_choice": "lowest annotation id per image, images by id" if coco else "first lines of the file",
                     "references": cfg.references, "num_references": len(plan["references"]) - len(skipped),
                     "references_skipped": skipped, "image_size": plan["size"], "guidance_scale": plan["guidance"],
                     "seeds": f"{cfg.seed} + image index", "teacher": plan["teacher"], "metrics": [m.name for m in metrics]},
        "student": student,
        "results": results,
        "environment": _environment(cfg),
    }
    seats = {label: denoiser(pipe) for label, pipe, _ in runs}
    flow = {label: type(net).__name__ for label, (key, net) in seats.items() if key == "denoiser_latency_s"}
    if flow:  # SD3's pipeline: which network sits in the transformer seat (the UNet protocol stays as it was)
        payload["protocol"]["denoisers"] = flow
    tmp = os.path.join(cfg.output, "metrics.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, os.path.join(cfg.output, "metrics.json"))
    write_report(payload, os.path.join(cfg.output, "report.html"), grid_path, (rows, labels, grid_captions))
    return payload


def _environment(cfg: EvalConfig) -> dict:
    import diffusers
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": cfg.device, "dtype": cfg.dtype,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def parse_args(argv=None) -> EvalConfig:
    return parse(EvalConfig, argv, prog="distill eval", description=__doc__.split("\n")[0])[0]


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    try:
        validate(cfg)
    except UserError:
        raise
    except (ValueError, OSError) as err:  # bad arguments or inputs (TeacherError, missing files): one line before any work
        raise UserError(str(err)) from None
    payload = evaluate(cfg)
    for model, by_steps in payload["results"].items():
        for steps, row in by_steps.items():
            print(f"{model:>8} {steps:>3} steps: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
    print(f"wrote {os.path.join(cfg.output, 'metrics.json')} and report.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("distill eval", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
