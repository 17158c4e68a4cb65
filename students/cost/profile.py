"""Cost of the student presets beside their teachers: parameters, MACs, latency, per-block shares.

    python -m students.cost.profile                                   # default presets, native resolutions
    distill profile --presets mobilediffusion,vae_tiny --repeats 5 --json out/cost.json
    distill profile --latency-resolution sdxl=512                # SDXL family timed at 512 px
    distill profile --device cuda --dtype bfloat16
    distill profile --lookup out/lookup.json --presets shapes --batch_size 2 --repeats 30   # students/cost/lookup.py

Each student is measured with its teacher in the same run: SD-1.5's UNet (``teachers.configs.sd15_unet()``)
at 512 px (64x64 latents) for ``snapfusion``/``mobilediffusion``, SDXL's UNet at 1024 px for ``snapgen``,
SD3-Medium's MMDiT (``sd3``, 333 prompt tokens) at 1024 px for ``snapgen_sd3`` (SnapGen's UNet in the
transformer's seat; ``sd3_transformer_macs`` counts the MMDiT by hand as a check), SD's VAE decoder at
512 px for the decoders. MACs are counted on the ``meta`` device (no memory, no
weights) with ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2; attention products
included: on real CPU tensors SDPA's kernel is not counted, on ``meta`` it decomposes into matmuls).
Latency is the median of ``--repeats`` forwards after ``--warmup``, with random weights; forward hooks
time each top-level block for the per-block table (SnapFusion's architecture evolution scores blocks
by such a latency breakdown, arXiv 2306.00980 Sec. 3.2).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass

from core.allocator import ALLOCATORS
from core.devices import check_device
from core.errors import UserError, run_main
from core.options import option, parse

# student -> (kind, teacher); teachers are measured whenever one of their students is.
STUDENTS = {
    "snapfusion": ("unet", "sd15"),
    "mobilediffusion": ("unet", "sd15"),
    "snapgen": ("unet", "sdxl"),
    "snapgen_sd3": ("unet", "sd3"),
    "tiny": ("unet", "tiny_teacher"),
    "tiny_xl": ("unet", "tiny_xl_teacher"),
    "vae_pruned": ("vae", "sd_vae_decoder"),
    "vae_tiny": ("vae", "sd_vae_decoder"),
}
TEACHERS = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "tiny_teacher": "unet", "tiny_xl_teacher": "unet", "sd_vae_decoder": "vae"}
FAMILY = {"sd15": "sd15", "snapfusion": "sd15", "mobilediffusion": "sd15", "sdxl": "sdxl", "snapgen": "sdxl", "sd3": "sd3", "snapgen_sd3": "sd3",
          "tiny_teacher": "tiny", "tiny": "tiny", "tiny_xl_teacher": "tiny", "tiny_xl": "tiny",
          "sd_vae_decoder": "vae", "vae_pruned": "vae", "vae_tiny": "vae"}
NATIVE_PIXELS = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "tiny": 128, "vae": 512}
# SD3's prompt states: CLIP-L and bigG's 77 tokens (widths concatenated, zero-padded to 4096) followed by T5's
# 256 (zeros when the T5 encoder is left out, as diffusers does with text_encoder_3=None): 333 tokens either way
SD3_TEXT_TOKENS = 77 + 256
DEFAULT_PRESETS = ("snapfusion", "mobilediffusion", "snapgen", "vae_pruned", "vae_tiny")
DTYPES = ("float32", "bfloat16", "float16")
REST = "(rest)"  # per-block tables: conv_in/out, embeddings, post_quant_conv, hook gaps


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    presets: tuple[str, ...] = DEFAULT_PRESETS  # students to measure (their teachers come along)
    batch_size: int = 1  # samples per forward
    repeats: int = 3  # timed forwards per model (the median is reported)
    warmup: int = 1  # untimed forwards before timing
    resolution: dict = dataclasses.field(default_factory=dict)  # family -> pixels for MACs and latency (default native)
    latency_resolution: dict = dataclasses.field(default_factory=dict)  # family -> pixels for latency only
    skip_latency: bool = False  # parameters and MACs only
    device: str = "cpu"  # where latency is measured
    dtype: str = "float32"  # weights and activations for latency (bfloat16 on GPU)
    blocks: bool = True  # print the per-block table

    def pixels(self, name: str, latency: bool = False) -> int:
        """Image side in pixels for ``name``: latency table first (if asked), then resolution, then native."""
        family = FAMILY[name]
        for table in ((self.latency_resolution,) if latency else ()) + (self.resolution,):
            for key in (family, "*"):
                if key in table:
                    return int(table[key])
        return NATIVE_PIXELS[family]


@dataclass
class Measurement:
    name: str
    role: str  # student | teacher
    teacher: str | None
    params: int  # parameters the forward uses (decoders: decoder + post_quant_conv)
    mac_pixels: int
    macs: float  # multiply-accumulates of one forward at batch_size
    latency_pixels: int | None = None
    latency_s: float | None = None  # median seconds per forward
    latency_runs: list | None = None
    blocks: list | None = None  # [{"block", "macs", "latency_s"}], top-level blocks in execution order, then REST


# ------------------------------------------------------------------------------------------
# models and inputs
# ------------------------------------------------------------------------------------------


def build_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """Random-weight model for a student or teacher name, created directly on ``device``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from students.models.unet import build_unet
    from students.models.vae import build_vae
    from teachers import configs

    teacher_unets = {"sd15": configs.sd15_unet, "sdxl": configs.sdxl_unet, "tiny_teacher": configs.tiny_unet,
                     "tiny_xl_teacher": configs.tiny_xl_unet}
    with torch.device(device):
        if name == "sd3":  # SD3-Medium's MMDiT (the transformer of ``teachers.load``'s sd3-random)
            from diffusers import SD3Transformer2DModel

            model = SD3Transformer2DModel(**configs.sd3_medium_transformer())
        elif name in teacher_unets:
            model = UNet2DConditionModel(**teacher_unets[name]())
        elif name == "sd_vae_decoder":
            model = AutoencoderKL(**configs.sd_vae())
        elif name.startswith("vae_"):
            model = build_vae(name[len("vae_"):])
        else:
            model = build_unet(name)
    if dtype != "float32":  # built in float32; cast only when asked (bf16 on GPU)
        model = model.to(dtype=getattr(torch, dtype))
    return model.eval()


def make_inputs(name: str, model, batch: int, pixels: int, device: str, dtype: str) -> tuple[tuple, dict]:
    """Positional and keyword arguments of one forward: UNets get noisy latents, a timestep, text
    states (and SDXL's pooled embeds + time ids); decoders get latents."""
    import torch

    gen = torch.Generator().manual_seed(0)
    tdtype = getattr(torch, dtype)

    def rand(*shape):
        if device == "meta":
            return torch.zeros(*shape, device="meta", dtype=tdtype)
        return torch.randn(*shape, generator=gen).to(device=device, dtype=tdtype)

    if kind_of(name) == "vae":
        return (rand(batch, 4, pixels // 8, pixels // 8),), {}
    cfg = model.config
    if kind_of(name) == "transformer":  # SD3's call: latents, sigma * 1000, prompt states, pooled embedding
        return (), {"hidden_states": rand(batch, cfg.in_channels, pixels // 8, pixels // 8),
                    "timestep": torch.full((batch,), 500.0, device=device, dtype=tdtype),
                    "encoder_hidden_states": rand(batch, SD3_TEXT_TOKENS, cfg.joint_attention_dim),
                    "pooled_projections": rand(batch, cfg.pooled_projection_dim)}
    latents = rand(batch, cfg.in_channels, pixels // 8, pixels // 8)  # 16 for SD3-shaped students
    tokens = SD3_TEXT_TOKENS if cfg.addition_embed_type == "pooled" else 77  # an SD3 student reads SD3's prompt states
    kwargs = {"encoder_hidden_states": rand(batch, tokens, cfg.cross_attention_dim)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=device, dtype=tdtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled), "time_ids": time_ids}
    elif cfg.addition_embed_type == "pooled":  # SD3-shaped students: the pooled text embedding alone
        kwargs["added_cond_kwargs"] = {"text_embeds": rand(batch, cfg.projection_class_embeddings_input_dim)}
    timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
    return (latents, timestep), kwargs


def kind_of(name: str) -> str:
    return STUDENTS[name][0] if name in STUDENTS else TEACHERS[name]


def forward(name: str, model, args, kwargs):
    if kind_of(name) == "vae":
        return model.decode(*args).sample
    return model(*args, **kwargs).sample


def count_params(name: str, model) -> int:
    if kind_of(name) == "vae":
        from students.models.vae import decoder_parameters

        return decoder_parameters(model)
    return sum(p.numel() for p in model.parameters())


def block_groups(name: str, model) -> list[tuple[str, list[str]]]:
    """Top-level blocks in execution order as (label, module names run back to back)."""
    import torch

    if kind_of(name) == "transformer":
        return [(f"transformer_blocks.{i}", [f"transformer_blocks.{i}"]) for i in range(len(model.transformer_blocks))]
    if kind_of(name) == "unet":
        names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))] + ["mid_block"]
        return [(n, [n]) for n in names + [f"up_blocks.{j}" for j in range(len(model.up_blocks))]]
    decoder = model.decoder
    if hasattr(decoder, "up_blocks"):  # AutoencoderKL's Decoder
        names = ["decoder.conv_in", "decoder.mid_block"] + [f"decoder.up_blocks.{i}" for i in range(len(decoder.up_blocks))]
        return [(n, [n]) for n in names]
    groups, current = [], []  # AutoencoderTiny's DecoderTiny: one group per resolution, split after each upsample
    for i, layer in enumerate(decoder.layers):
        current.append(f"decoder.layers.{i}")
        if isinstance(layer, torch.nn.Upsample) or i == len(decoder.layers) - 1:
            groups.append((f"decoder.layers.{current[0].rsplit('.', 1)[1]}-{i}", current))
            current = []
    return groups


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------


def count_macs(name: str, cfg: ProfileConfig) -> tuple[int, float, dict[str, float]]:
    """(parameters, MACs, MACs per block label) of one forward, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name, "meta", "float32")
    args, kwargs = make_inputs(name, model, cfg.batch_size, cfg.pixels(name), "meta", "float32")
    with FlopCounterMode(display=False, depth=None) as counter, torch.no_grad():
        forward(name, model, args, kwargs)
    per_module = counter.get_flop_counts()
    blocks = {label: sum(sum(per_module.get(_flop_key(name, model, m), {}).values()) for m in names) / 2
              for label, names in block_groups(name, model)}
    return count_params(name, model), counter.get_total_flops() / 2, blocks


def sd3_transformer_macs(config, pixels: int, batch: int = 1, text_tokens: int = SD3_TEXT_TOKENS) -> int:
    """Multiply-accumulates of one ``SD3Transformer2DModel`` forward, counted by hand from its layers
    (an independent check on ``count_macs``; no published MAC figure for SD3-Medium was found).

    With width D = heads x head_dim, N image tokens ((pixels / 8 / patch)^2) and T text tokens, per image:
    patch embedding N (C p^2) D; context embedder T joint_dim D; time and pooled-text MLPs
    256 D + D^2 + pooled D + D^2. Each of the L joint blocks (Esser et al. 2024, Fig. 2): both streams'
    adaLN modulation D 6D; image q, k, v, out and the 4x MLP, 12 D^2 per token; text q, k, v 3 D^2 per
    token and, except in the last block (context_pre_only: the text stream ends after its q, k, v, its
    modulation D 2D), text out and MLP 9 D^2; joint attention QK^T and AV over N + T tokens, 2 (N + T)^2 D.
    Output: adaLN D 2D and the unpatchify projection N D (p^2 C_out). Biases, norms and activations are
    not MACs. SD3-Medium at 1024 px, T = 333: 4,452.17 GMACs, of which 1,446.25 are attention products."""
    c = config
    d = c.num_attention_heads * c.attention_head_dim
    n = (pixels // 8 // c.patch_size) ** 2
    t = text_tokens
    macs = n * c.in_channels * c.patch_size ** 2 * d + t * c.joint_attention_dim * d  # patch + context embedders
    macs += 256 * d + d * d + c.pooled_projection_dim * d + d * d  # time and pooled-text embeddings
    for i in range(c.num_layers):
        last = i == c.num_layers - 1
        macs += d * 6 * d + d * (2 if last else 6) * d  # adaLN modulation of the image and text streams
        macs += n * 12 * d * d + t * (3 if last else 12) * d * d + 2 * (n + t) ** 2 * d
    macs += d * 2 * d + n * d * c.patch_size ** 2 * c.out_channels  # norm_out's modulation, proj_out
    return batch * macs


def _flop_key(name: str, model, module_name: str) -> str:
    """FlopCounterMode names modules from the outermost one whose forward ran: the UNet itself, but
    ``Decoder``/``DecoderTiny`` for ``vae.decode`` (the autoencoder's own forward never runs)."""
    head, _, rest = module_name.partition(".")
    if kind_of(name) == "vae" and head == "decoder":
        return f"{type(model.decoder).__name__}.{rest}"
    return f"{type(model).__name__}.{module_name}"


class _BlockTimer:
    """Forward hooks that time each block group of one model (pre-hook on its first module, post-hook on its last)."""

    def __init__(self, name: str, model, sync):
        self.starts, self.current, self.handles = {}, {}, []
        for label, names in block_groups(name, model):
            first, last = model.get_submodule(names[0]), model.get_submodule(names[-1])
            self.handles += [first.register_forward_pre_hook(self._pre(label, sync)),
                             last.register_forward_hook(self._post(label, sync))]

    def _pre(self, label, sync):
        def hook(module, inputs):
            sync()
            self.starts[label] = time.perf_counter()
        return hook

    def _post(self, label, sync):
        def hook(module, inputs, output):
            sync()
            self.current[label] = time.perf_counter() - self.starts[label]
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure_latency(names: list[str], cfg: ProfileConfig) -> dict[str, tuple[float, list[float], dict[str, float]]]:
    """name -> (median seconds, timed runs, median seconds per block) on ``cfg.device``; the block
    dict's ``REST`` entry is the median over runs of the time outside the listed blocks.

    A teacher and its students are timed in interleaved rounds (the order rotating each round), so
    load from other processes on a shared machine hits them alike and the ratios stay fair.
    """
    import torch

    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    models, inputs, timers = {}, {}, {}
    for name in names:
        models[name] = build_model(name, cfg.device, cfg.dtype)
        inputs[name] = make_inputs(name, models[name], cfg.batch_size, cfg.pixels(name, latency=True), cfg.device, cfg.dtype)
        timers[name] = _BlockTimer(name, models[name], sync)
    totals = {name: [] for name in names}
    per_block = {name: [] for name in names}
    try:
        with torch.inference_mode():
            for i in range(cfg.warmup + cfg.repeats):
                for name in names[i % len(names):] + names[: i % len(names)]:
                    timers[name].current.clear()
                    sync()
                    t0 = time.perf_counter()
                    forward(name, models[name], *inputs[name])
                    sync()
                    if i >= cfg.warmup:
                        totals[name].append(time.perf_counter() - t0)
                        per_block[name].append(dict(timers[name].current))
    finally:
        for timer in timers.values():
            timer.remove()
        models.clear()
        gc.collect()
    results = {}
    for name in names:
        blocks = {label: statistics.median(run[label] for run in per_block[name]) for label in per_block[name][0]}
        blocks[REST] = statistics.median(total - sum(run.values()) for total, run in zip(totals[name], per_block[name]))
        results[name] = (statistics.median(totals[name]), totals[name], blocks)
    return results


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def profile(cfg: ProfileConfig, log=_log, clock=time.monotonic) -> list[Measurement]:
    """Measure every requested student and its teacher (teacher first, then its students).

    ``log`` gets a line before each model starts and one as each finishes (its latency, how many
    models are left, the ETA: the time per model so far times the models left); a teacher and its
    students finish together, after their interleaved timing rounds."""
    from core.progress import eta_seconds, format_duration

    groups: dict[str, list[str]] = {}
    for student in cfg.presets:
        groups.setdefault(STUDENTS[student][1], []).append(student)
    total = sum(1 + len(students) for students in groups.values())
    start, finished, number = clock(), 0, {}

    def done(m: Measurement) -> None:
        nonlocal finished
        finished += 1
        latency = "latency skipped" if m.latency_s is None else f"{m.latency_s * 1e3:.2f} ms at {m.latency_pixels} px"
        eta = format_duration(eta_seconds(clock() - start, finished, total - finished))
        log(f"[profile] {number[m.name]}/{total} {m.name}: {latency}, {m.macs / 1e9:.2f} GMACs at {m.mac_pixels} px; "
            f"done, {total - finished} left, ETA {eta}")

    results = []
    for teacher, students in groups.items():
        names = [teacher, *students]
        group = []
        for name in names:
            role = "teacher" if name in TEACHERS else "student"
            number[name] = len(number) + 1
            log(f"[profile] {number[name]}/{total} {name} start: MACs at {cfg.pixels(name)} px"
                + ("" if cfg.skip_latency else f", then latency with {', '.join(n for n in names if n != name) or 'itself'}"))
            params, macs, block_macs = count_macs(name, cfg)
            m = Measurement(name=name, role=role, teacher=STUDENTS[name][1] if role == "student" else None,
                            params=params, mac_pixels=cfg.pixels(name), macs=macs)
            m.blocks = [{"block": label, "macs": v, "latency_s": None} for label, v in block_macs.items()]
            group.append(m)
            if cfg.skip_latency:  # nothing more to measure: done now
                m.blocks.append({"block": REST, "macs": m.macs - sum(row["macs"] for row in m.blocks), "latency_s": None})
                done(m)
        if not cfg.skip_latency:
            log(f"[profile] timing {', '.join(names)} (interleaved, {cfg.warmup} + {cfg.repeats} rounds) ...")
            timed = measure_latency(names, cfg)
            for m in group:
                m.latency_pixels = cfg.pixels(m.name, latency=True)
                m.latency_s, m.latency_runs, block_latency = timed[m.name]
                for row in m.blocks:
                    row["latency_s"] = block_latency.get(row["block"])
                m.blocks.append({"block": REST, "macs": m.macs - sum(row["macs"] for row in m.blocks),
                                 "latency_s": block_latency[REST]})
                done(m)
        results += group
    return results


def ratios(results: list[Measurement]) -> list[dict]:
    """Student / teacher for parameters, MACs and latency, measured in this run.

    ``latency`` is the median over rounds of student time / teacher time *in the same round* (the two
    ran back to back), which stays meaningful when other processes load a shared CPU unevenly;
    ``latency_of_medians`` is the plain ratio of the two medians.
    """
    by_name = {m.name: m for m in results}
    rows = []
    for m in results:
        if m.role != "student":
            continue
        t = by_name[m.teacher]
        paired = of_medians = None
        if m.latency_s and t.latency_s and m.latency_pixels == t.latency_pixels:
            of_medians = m.latency_s / t.latency_s
            paired = statistics.median(s / r for s, r in zip(m.latency_runs, t.latency_runs))
        rows.append({"student": m.name, "teacher": t.name, "params": m.params / t.params,
                     "macs": m.macs / t.macs if m.mac_pixels == t.mac_pixels else None,
                     "latency": paired, "latency_of_medians": of_medians})
    return rows


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def format_report(results: list[Measurement], cfg: ProfileConfig) -> str:
    import torch

    threads = torch.get_num_threads()
    lines = [f"batch {cfg.batch_size}; latency: {cfg.dtype} on {cfg.device}"
             + (f" ({threads} threads)" if cfg.device == "cpu" else "")
             + f", median of {cfg.repeats} after {cfg.warmup} warm-up" + (" [skipped]" if cfg.skip_latency else ""),
             "MACs: FlopCounterMode on the meta device, MACs = FLOPs / 2, attention products included",
             "latency with random weights; block times by forward hooks (median per block over the timed runs)", ""]
    ratio = {r["student"]: r for r in ratios(results)}
    head = (f"{'model':<16} {'role':<8} {'teacher':<15} {'params':>10} {'GMACs':>9} {'px':>5} {'median s':>9} {'min s':>8} "
            f"{'px':>5}  {'params':>7} {'MACs':>7} {'latency':>7}")
    lines += [head, "-" * len(head)]
    for m in results:
        r = ratio.get(m.name, {})
        lines.append(f"{m.name:<16} {m.role:<8} {m.teacher or '-':<15} {m.params / 1e6:>9.2f}M {m.macs / 1e9:>9.2f} {m.mac_pixels:>5} "
                     f"{_fmt(m.latency_s, '9.3f'):>9} {_fmt(m.latency_runs and min(m.latency_runs), '8.3f'):>8} "
                     f"{_fmt(m.latency_pixels, '5d'):>5}  {_fmt(r.get('params'), '7.3f'):>7} "
                     f"{_fmt(r.get('macs'), '7.3f'):>7} {_fmt(r.get('latency'), '7.3f'):>7}")
    lines.append("(ratios = student / its teacher in this run at the same resolution; latency ratio = median over rounds of the "
                 "student/teacher time ratio within a round, teacher and students timed back to back in rotating order)")
    if any(m.latency_pixels != m.mac_pixels for m in results if m.latency_pixels):
        lines.append("NOTE: some latencies are measured at a lower resolution than the MACs (see the px columns).")
    if cfg.blocks:
        for m in results:
            lines += ["", f"per-block cost of {m.name} ({m.mac_pixels} px MACs"
                      + (f", {m.latency_pixels} px latency)" if m.latency_s else ")")]
            lines.append(f"  {'block':<22} {'GMACs':>9} {'share':>6} {'ms':>10} {'share':>6}")
            for row in m.blocks:
                lat = row["latency_s"]
                lines.append(f"  {row['block']:<22} {row['macs'] / 1e9:>9.2f} {row['macs'] / m.macs:>6.1%} "
                             f"{_fmt(lat and lat * 1e3, '10.1f'):>10} {_fmt(lat and m.latency_s and lat / m.latency_s, '6.1%'):>6}")
    return "\n".join(lines)


def report_json(results: list[Measurement], cfg: ProfileConfig) -> dict:
    import diffusers
    import torch

    return {"config": dataclasses.asdict(cfg),
            "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "device": cfg.device, "dtype": cfg.dtype},
            "measurements": [dataclasses.asdict(m) for m in results], "ratios": ratios(results)}


def write_json(path: str, payload: dict) -> None:
    import fsspec

    with fsspec.open(path, "w") as f:
        json.dump(payload, f, indent=2)


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def _pixels_arg(flag: str, text: str) -> dict:
    """``"512"`` (every family) or ``"sdxl=512,sd15=256"`` -> {family or "*": pixels}."""
    table = {}
    for item in filter(None, text.split(",")):
        family, _, px = item.rpartition("=")
        family = family or "*"
        if family != "*" and family not in NATIVE_PIXELS:
            raise UserError(f"--{flag}: unknown family {family!r} in {text!r}; known: {', '.join(sorted(NATIVE_PIXELS))}")
        if not px.isdigit() or int(px) < 64 or int(px) % 64:
            raise UserError(f"--{flag}: resolution {px!r} in {text!r} must be a positive multiple of 64 pixels")
        table[family] = int(px)
    return table


_S_MODELS = "models and sizes"
_S_TIMING = "timing"
_S_OUTPUT = "output"
_S_LOOKUP = "latency lookup table (students/cost/lookup.py)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    presets: str = option(",".join(DEFAULT_PRESETS), section=_S_MODELS,
                          help=f"comma-separated students or 'all' (known: {', '.join(STUDENTS)})")
    batch_size: int = option(1, section=_S_MODELS, help="images per forward")
    repeats: int = option(3, section=_S_TIMING, help="timed forwards per model after the warm-up")
    warmup: int = option(1, section=_S_TIMING, help="untimed forwards before timing")
    resolution: str = option("", section=_S_MODELS,
                             help="pixels for MACs and latency: PX or family=PX,... (default: each family's native)")
    latency_resolution: str = option("", section=_S_MODELS, help="pixels for latency only: PX or family=PX,...")
    skip_latency: bool = option(False, section=_S_TIMING, help="parameters and MACs only")
    no_blocks: bool = option(False, section=_S_OUTPUT, help="omit the per-block table")
    device: str = option("cpu", section=_S_TIMING, help="cpu | cuda | cuda:N")
    dtype: str = option("float32", section=_S_TIMING, help="weights and activations dtype", choices=DTYPES)
    threads: int | None = option(None, section=_S_TIMING, help="torch.set_num_threads for CPU latency")
    json: str | None = option(None, section=_S_OUTPUT, help="also write the figures to this path (local or fsspec URL)")
    # latency lookup table (students/cost/lookup.py): one UNet, per block type
    lookup: str | None = option(None, section=_S_LOOKUP,
                                help="write the latency lookup table of one UNet (--presets NAME or --unet_config) here")
    unet_config: str | None = option(None, section=_S_LOOKUP,
                                     help="with --lookup: a student UNet config.json (e.g. an evolved run's student_config.json)")
    lookup_statistic: str = option("median", section=_S_LOOKUP,
                                   help="with --lookup: median | min of the timed runs (min resists other processes' load)",
                                   choices=("median", "min"))
    lookup_allocator: str = option("steady", section=_S_LOOKUP,
                                   help="with --lookup: steady (glibc keeps freed memory, so timed forwards pay no "
                                   "page faults; core/allocator.py) | default (the allocator as the process has it)",
                                   choices=ALLOCATORS)

    def __post_init__(self):
        for flag in ("batch_size", "repeats"):
            if getattr(self, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(self, flag)}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        if not (self.device == "cpu" or self.device == "cuda" or re.fullmatch(r"cuda:\d+", self.device)):
            raise UserError(f"--device {self.device!r} is not cpu or cuda[:N]")


def parse_args(argv=None) -> tuple[ProfileConfig, str | None]:
    args, _ = parse(ProfileOptions, argv, prog="distill profile", description=__doc__.split("\n")[0])
    presets = tuple(STUDENTS) if args.presets == "all" else tuple(p.strip() for p in args.presets.split(",") if p.strip())
    unknown = [p for p in presets if p not in STUDENTS]
    if unknown or not presets:
        raise UserError(f"--presets: unknown preset(s) {unknown or presets}; known: {', '.join(STUDENTS)}")
    resolution = _pixels_arg("resolution", args.resolution)
    latency_resolution = _pixels_arg("latency-resolution", args.latency_resolution)
    check_device(args.device)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    cfg = ProfileConfig(presets=presets, batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup,
                        resolution=resolution, latency_resolution=latency_resolution, skip_latency=args.skip_latency,
                        device=args.device, dtype=args.dtype, blocks=not args.no_blocks)
    return cfg, args.json


def lookup_unet_config(args: ProfileOptions):
    """The one UNet config a ``--lookup`` run measures: ``--unet_config`` or a single ``students.models.unet`` preset."""
    from students.models.unet import PRESETS, StudentUNetConfig, preset

    if args.unet_config:
        from core.fs import exists, read_json

        if not exists(args.unet_config):
            raise UserError(f"--unet_config {args.unet_config!r} not found")
        fields = {f.name for f in dataclasses.fields(StudentUNetConfig)}
        raw = read_json(args.unet_config)
        try:
            return StudentUNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})
        except (TypeError, ValueError) as err:
            raise UserError(f"--unet_config {args.unet_config!r}: {err}") from None
    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    if len(names) != 1 or names[0] not in PRESETS:
        raise UserError(f"--lookup measures one UNet: pass --presets NAME (one of {', '.join(sorted(PRESETS))}) "
                        f"or --unet_config PATH, got --presets {args.presets!r}")
    return preset(names[0])


def _lookup_main(args: ProfileOptions) -> int:
    """``--lookup OUT.json``: the per-block latency table of one UNet, then predicted against a fresh measurement."""
    import torch

    from students.cost import lookup as L

    cfg = lookup_unet_config(args)
    if args.resolution and (not args.resolution.isdigit() or int(args.resolution) % 8):
        raise UserError(f"--resolution with --lookup is one pixel size (a multiple of 8), got {args.resolution!r}")
    check_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = L.LookupSettings(batch_size=args.batch_size, side=int(args.resolution) // 8 if args.resolution else None,
                                repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
                                statistic=args.lookup_statistic, allocator=args.lookup_allocator)
    table = L.measure_table(cfg, settings, progress=True)
    print(L.format_table(table))
    predicted, measured = table.predict_ms(cfg), L.measure_ms(cfg, settings)
    print(f"\npredicted {predicted:.3f} ms, measured again {measured:.3f} ms ({predicted / measured - 1:+.1%})")
    table.save(args.lookup)
    print(f"wrote {args.lookup}")
    return 0


def _main(argv: list[str]) -> int:
    from core.fs import check_output_file

    args, _ = parse(ProfileOptions, argv, prog="distill profile", description=__doc__.split("\n")[0])
    for flag in ("json", "lookup"):  # before the models are built and timed
        if getattr(args, flag):
            check_output_file(getattr(args, flag), f"--{flag}")
    check_device(args.device)
    if args.lookup:
        return _lookup_main(args)
    cfg, json_path = parse_args(argv)
    results = profile(cfg)
    print(format_report(results, cfg))
    if json_path:
        write_json(json_path, report_json(results, cfg))
        print(f"\nwrote {json_path}")
    return 0


def main(argv=None) -> int:
    return run_main("distill profile", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
