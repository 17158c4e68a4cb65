"""Latency lookup table of a student UNet's blocks (SnapFusion, arXiv 2306.00980, Sec. 3.2 and Algorithm 1).

    distill profile --lookup out/lookup.json --presets shapes --batch_size 2 --repeats 30
    distill profile --lookup out/lookup.json --unet_config runs/evo/student_config.json

The table holds, for every block type of one UNet, its median (or minimum) latency on the runtime it was measured
on (PyTorch on CPU here; any runtime can write the same format): a block type is a layout token
(``R`` ResNet, ``T``/``C``/``S`` transformer with its depth) with its input and output channels at its
level's resolution, so blocks that run the same computation share one entry. Each block is timed
inside the whole UNet (forward pre/post hooks, so caches and threads are as in a real forward); the
*rest* (``conv_in``, embeddings, down/upsamplers, ``conv_out``, the glue between blocks) is the median
plain forward, timed without hooks in alternating rounds, minus the sum of the block medians.

A UNet's predicted latency is the sum of its blocks' entries plus the rest (``predict_ms``): it is
valid for any UNet of the same family (the same config except the layouts), which is what
architecture evolution changes. The file records the settings (runtime, dtype, batch, latent side,
threads, repeats, library versions) and the UNet it was measured on; ``LookupTable.load`` checks the
format and names what is wrong.

Every timing runs in one allocator state (``LookupSettings.allocator``). With the default ``steady``,
glibc keeps the memory a forward frees (no mmap'd chunks, no trimming: ``mallopt``), so each timed
forward reuses pages it already touched. Without it, glibc hands large activations back to the kernel
as they are freed and takes fresh zeroed pages in the next forward: on the snapfusion preset at
256 px that is about 610,000 minor page faults and 1.1 s of system time per 3.6 s forward, an
amount that depends on the process's history rather than on the UNet, which the additive model
(block entries + rest) cannot represent. ``default`` leaves the allocator as the process has it.
The state is process-wide and stays set (``core.allocator``); the table records it
(``settings["allocator_detail"]``).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass

from core.allocator import ALLOCATORS, set_allocator
from core.errors import UserError
from core.options import differing_fields

FORMAT = "distill-latency-lookup/1"
LAYOUT_FIELDS = ("down_layouts", "mid_layout", "up_layouts")  # what evolution changes; the rest is the family
STATISTICS = {"median": statistics.median, "min": min}


@dataclass(frozen=True)
class Block:
    """One block of a UNet config: where it runs and what it computes."""

    stage: str  # down_blocks.I | mid_block | up_blocks.J
    position: int  # index of its token in the stage's layout string
    token: str  # layout token: R, T, T2, C, S, ...
    module: str  # module name in EfficientUNet2DConditionModel, e.g. down_blocks.1.attentions.0
    level: int  # resolution level (0 = highest)
    in_channels: int  # input channels (up-stage ResNets: hidden + skip)
    out_channels: int

    @property
    def is_resnet(self) -> bool:
        return self.token == "R"

    def key(self, side: int) -> str:
        """Lookup key at latent side ``side``: what the block computes, not where it sits."""
        res = side >> self.level
        return f"{self.token} {self.in_channels}->{self.out_channels} @{res}x{res}"


def unet_blocks(cfg) -> list[Block]:
    """Every ResNet and transformer block of a ``StudentUNetConfig``, in execution order.

    Channels follow ``EfficientUNet2DConditionModel.__init__``: the first ResNet of a stage maps the
    incoming channels to the level's, an up-stage ResNet first concatenates the next skip."""
    from students.models.blocks import parse_layout

    chans, levels = cfg.block_out_channels, len(cfg.block_out_channels)
    blocks: list[Block] = []

    def stage(name, layout, level, ch_in, skips=None):
        counts = {"R": 0, "A": 0}
        for pos, (kind, depth) in enumerate(parse_layout(layout, first_resnet=name != "mid_block")):
            token = kind if depth == 1 else f"{kind}{depth}"
            group = "R" if kind == "R" else "A"
            module = f"{name}.{'resnets' if group == 'R' else 'attentions'}.{counts[group]}"
            counts[group] += 1
            if kind == "R":
                extra = skips.pop() if skips is not None else 0
                blocks.append(Block(name, pos, token, module, level, ch_in + extra, chans[level]))
                ch_in = chans[level]
            else:
                blocks.append(Block(name, pos, token, module, level, chans[level], chans[level]))
        return counts["R"]

    skips, ch = [chans[0]], chans[0]
    for level in range(levels):
        n_res = stage(f"down_blocks.{level}", cfg.down_layouts[level], level, ch)
        ch = chans[level]
        skips += [ch] * (n_res + (level < levels - 1))
    stage("mid_block", cfg.mid_layout, levels - 1, ch)
    for j in range(levels):
        level = levels - 1 - j
        stage(f"up_blocks.{j}", cfg.up_layouts[j], level, ch, skips)
        ch = chans[level]
    return blocks


@dataclass(frozen=True, kw_only=True)
class LookupSettings:
    """How a table is measured (written into it)."""

    batch_size: int = 2  # samples per forward (2: one CFG step of one image)
    side: int | None = None  # latent side; None = the config's sample_size
    text_tokens: int = 77  # encoder_hidden_states length
    repeats: int = 20  # timed forwards (each: one plain and one hooked)
    warmup: int = 3  # untimed forwards first
    device: str = "cpu"
    dtype: str = "float32"
    statistic: str = "median"  # median | min (min: robust to other processes' load on a shared machine)
    allocator: str = "steady"  # steady: glibc keeps freed memory (no page faults between forwards) | default

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise UserError(f"lookup settings: statistic {self.statistic!r} is not one of {', '.join(STATISTICS)}")
        if self.allocator not in ALLOCATORS:
            raise UserError(f"lookup settings: allocator {self.allocator!r} is not one of {', '.join(ALLOCATORS)}")
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0 or self.text_tokens < 1:
            raise UserError(f"lookup settings: batch_size={self.batch_size}, repeats={self.repeats} must be >= 1, "
                            f"warmup={self.warmup} >= 0")


@dataclass
class LookupTable:
    """Median milliseconds per block type, the fixed rest, and how they were measured."""

    entries: dict[str, float]  # block key -> median ms
    rest_ms: float  # the UNet's time outside its blocks
    family: dict  # the config fields evolution keeps (everything but the layouts)
    unet: dict  # the UNet config it was measured on
    settings: dict  # LookupSettings + runtime, versions, threads
    measured_ms: float  # median plain forward of that UNet
    stages: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # key -> stages it was measured in
    samples: dict[str, int] = dataclasses.field(default_factory=dict)  # key -> timed occurrences behind the median

    def side(self) -> int:
        return int(self.settings["side"])

    def block_ms(self, block: Block) -> float:
        key = block.key(self.side())
        if key not in self.entries:
            raise UserError(f"the latency lookup has no entry for {block.module} ({key}); it was measured on "
                            f"layouts {[self.unet[f] for f in LAYOUT_FIELDS]}: measure one that has this block type")
        return self.entries[key]

    def predict_ms(self, cfg) -> float:
        """Sum of the blocks' entries plus the rest, for a config of this table's family."""
        check_family(self, cfg)
        return self.rest_ms + sum(self.block_ms(b) for b in unet_blocks(cfg))

    def to_json(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data, where: str = "lookup") -> "LookupTable":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{where}: not a latency lookup table (format {data.get('format') if isinstance(data, dict) else None!r}, "
                            f"expected {FORMAT!r}; write one with distill profile --lookup)")
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [f for f in fields if f not in data and f not in ("stages", "samples")]
        if missing:
            raise UserError(f"{where}: missing field(s) {missing}")
        entries = data["entries"]
        if not isinstance(entries, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in entries.values()):
            raise UserError(f"{where}: 'entries' must map block keys to non-negative milliseconds")
        return cls(**{f: data[f] for f in fields if f in data})

    def save(self, path: str) -> None:
        from core.fs import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "LookupTable":
        from core.fs import exists, read_json

        if not exists(path):
            raise UserError(f"latency lookup {path!r} not found (write one with distill profile --lookup)")
        try:
            data = read_json(path)
        except ValueError as err:
            raise UserError(f"latency lookup {path!r} is not JSON: {err}") from None
        return cls.from_json(data, where=path)


def family_of(cfg) -> dict:
    return {k: _plain(v) for k, v in cfg.to_dict().items() if k not in LAYOUT_FIELDS}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def check_family(table: LookupTable, cfg) -> None:
    fam = family_of(cfg)
    diff = differing_fields(fam, table.family)
    if diff:
        raise UserError(f"the latency lookup was measured on another UNet family: {diff} differ "
                        f"(lookup {[table.family.get(k) for k in diff]}, this UNet {[fam.get(k) for k in diff]})")


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------


def unet_inputs(model, settings: LookupSettings, side: int):
    """(args, kwargs) of one forward: random latents, timestep 500, text states (and SDXL's added conditions)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, settings.dtype)
    cfg = model.config
    b = settings.batch_size

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=settings.device, dtype=dtype)

    kwargs = {"encoder_hidden_states": rand(b, settings.text_tokens, cfg.cross_attention_dim)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        px = side * 8
        kwargs["added_cond_kwargs"] = {"text_embeds": rand(b, pooled),
                                       "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * b, device=settings.device, dtype=dtype)}
    elif cfg.addition_embed_type == "pooled":  # SD3-shaped students: the pooled text embedding alone
        kwargs["added_cond_kwargs"] = {"text_embeds": rand(b, cfg.projection_class_embeddings_input_dim)}
    timestep = torch.full((b,), 500, device=settings.device, dtype=torch.long)
    return (rand(b, cfg.in_channels, side, side), timestep), kwargs


def build_random_unet(cfg, settings: LookupSettings):
    """``cfg`` with seeded random weights on the settings' device and dtype, in eval mode."""
    import torch

    from students.models.unet import EfficientUNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(settings.device):
        model = EfficientUNet2DConditionModel.from_student_config(cfg)
    if settings.dtype != "float32":  # built in float32; cast only when asked
        model = model.to(dtype=getattr(torch, settings.dtype))
    return model.eval()


def _sync(settings: LookupSettings):
    import torch

    return torch.cuda.synchronize if settings.device.startswith("cuda") else (lambda: None)


def measure_ms(cfg, settings: LookupSettings = LookupSettings(), model=None) -> float:
    """Milliseconds (the settings' statistic: median or min) of a plain forward of ``cfg`` (random weights unless ``model`` is given)."""
    import torch

    set_allocator(settings.allocator)
    model = model if model is not None else build_random_unet(cfg, settings)
    side = settings.side or cfg.sample_size
    args, kwargs = unet_inputs(model, settings, side)
    sync, runs = _sync(settings), []
    with torch.inference_mode():
        for i in range(settings.warmup + settings.repeats):
            sync()
            t0 = time.perf_counter()
            model(*args, **kwargs)
            sync()
            if i >= settings.warmup:
                runs.append((time.perf_counter() - t0) * 1e3)
    return STATISTICS[settings.statistic](runs)


def measure_table(cfg, settings: LookupSettings = LookupSettings(), progress: bool = False) -> LookupTable:
    """Time every block of ``cfg`` inside the UNet (hooks) and the plain forward, in alternating rounds."""
    import diffusers
    import torch
    from tqdm import tqdm

    side = settings.side or cfg.sample_size
    if side % (2 ** (len(cfg.block_out_channels) - 1)):
        raise UserError(f"latent side {side} is not divisible by {2 ** (len(cfg.block_out_channels) - 1)} for this UNet")
    allocator = set_allocator(settings.allocator)  # recorded in the table
    model = build_random_unet(cfg, settings)
    args, kwargs = unet_inputs(model, settings, side)
    blocks = unet_blocks(cfg)
    sync = _sync(settings)
    times: dict[str, list[float]] = {b.module: [] for b in blocks}
    starts: dict[str, float] = {}
    handles, hooked = [], [False]

    def pre(name):
        def hook(module, inputs):
            if hooked[0]:
                sync()
                starts[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(module, inputs, output):
            if hooked[0]:
                sync()
                times[name].append((time.perf_counter() - starts[name]) * 1e3)
        return hook

    for b in blocks:
        module = model.get_submodule(b.module)
        handles += [module.register_forward_pre_hook(pre(b.module)), module.register_forward_hook(post(b.module))]
    plain = []
    try:
        with torch.inference_mode():
            for i in tqdm(range(settings.warmup + settings.repeats), desc="lookup", unit="round", disable=not progress):
                for with_hooks in ((False, True) if i % 2 else (True, False)):  # alternate which goes first
                    hooked[0] = with_hooks and i >= settings.warmup
                    sync()
                    t0 = time.perf_counter()
                    model(*args, **kwargs)
                    sync()
                    if not with_hooks and i >= settings.warmup:
                        plain.append((time.perf_counter() - t0) * 1e3)
    finally:
        for h in handles:
            h.remove()
    by_key: dict[str, list[float]] = {}
    stages: dict[str, list[str]] = {}
    for b in blocks:
        key = b.key(side)
        by_key.setdefault(key, []).extend(times[b.module])
        if b.stage not in stages.setdefault(key, []):
            stages[key].append(b.stage)
    stat = STATISTICS[settings.statistic]
    entries = {k: stat(v) for k, v in by_key.items()}
    measured = stat(plain)
    rest = measured - sum(entries[b.key(side)] for b in blocks)
    env = {"runtime": f"torch-{settings.device}", "torch": torch.__version__, "diffusers": diffusers.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "processor": _processor(),
           "allocator_detail": allocator}
    return LookupTable(entries=entries, rest_ms=rest, family=family_of(cfg), unet={k: _plain(v) for k, v in cfg.to_dict().items()},
                       settings=dict(dataclasses.asdict(settings), side=side, **env), measured_ms=measured,
                       stages=stages, samples={k: len(v) for k, v in by_key.items()})


def _processor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: the platform string is the best we have
        pass
    import platform

    return platform.processor() or platform.machine()


def settings_of(table: LookupTable) -> LookupSettings:
    """The settings a table was measured with (to measure other UNets the same way)."""
    names = {f.name for f in dataclasses.fields(LookupSettings)}
    return LookupSettings(**{k: v for k, v in table.settings.items() if k in names})


def format_table(table: LookupTable) -> str:
    s = table.settings
    lines = [f"latency lookup: {s['runtime']} {s['dtype']}, batch {s['batch_size']}, latent side {s['side']}, "
             f"{s['threads']} threads, {s.get('statistic', 'median')} of {s['repeats']} after {s['warmup']} warm-up, "
             f"allocator {s.get('allocator_detail', 'not recorded')}",
             f"  {'block type':<28} {'ms':>9} {'n':>4}  stages"]
    for key, ms in table.entries.items():
        lines.append(f"  {key:<28} {ms:>9.3f} {table.samples.get(key, 0):>4}  {', '.join(table.stages.get(key, []))}")
    lines.append(f"  {'(rest)':<28} {table.rest_ms:>9.3f}")
    lines.append(f"  {'measured forward':<28} {table.measured_ms:>9.3f}")
    return "\n".join(lines)
