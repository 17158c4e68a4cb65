"""Shared fixtures: built-in tiny teachers and a tiny teacher dump (built once per session), one torch
thread for modules of tiny models, and the offline environment."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations pings the network on import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Exported folders load their code through diffusers' dynamic-module cache (diffusers_modules.local): one per
# test session, so two sessions at once (or a user's own exports) never overwrite each other's copies.
if "HF_MODULES_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="dd-test-hf-modules-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher():
    from teachers.load import load_teacher

    return load_teacher("tiny")


@pytest.fixture(scope="session")
def tiny_xl_teacher():
    from teachers.load import load_teacher

    return load_teacher("tiny-xl")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is many times faster than two fighting for cores.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def torchrun():
    """(command prefix, environment) that launch two local gloo ranks. The rendezvous endpoint's port is 0, so
    the c10d store binds a free port itself: picking a port here and releasing it before torchrun binds it
    races with anything else on the machine that binds one in between."""
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [exe, "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"]
    return cmd, dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")


DUMP_DEFAULTS = {  # the tiny teacher's dump the trainer's tests share; a test overrides what it is about
    "teacher": "tiny", "num_inference_steps": 4, "samples_per_shard": 4, "batch_size": 8,
    "feature_layers": "mid_block,up_blocks.0", "num_feature_steps": 2, "progress": "off", "cpu_threads": 2,
}
SCENE_CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "blue") for s in ("circle", "square")
                  for b in ("white", "grey", "green", "black")]


def dump_flags(**overrides) -> list[str]:
    """The teacher dump's flags but its input and output: ``DUMP_DEFAULTS`` with ``overrides`` (``None`` drops a
    flag, ``True`` is a bare flag such as ``save_images``; underscores are kept, as the jobs spell their flags)."""
    argv = []
    for name, value in dict(DUMP_DEFAULTS, **overrides).items():
        if value is None or value is False:
            continue
        argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return argv


def dump_argv(prompts, output, **overrides) -> list[str]:
    """The teacher dump's argv: ``--prompts``, ``--output``, then ``dump_flags(**overrides)``."""
    return ["--prompts", str(prompts), "--output", str(output), *dump_flags(**overrides)]


def run_dump(root, captions=SCENE_CAPTIONS, **overrides) -> str:
    """Write ``captions`` to ``root/p.txt`` and dump them into ``root/out`` (``dump_argv``); -> the dump folder."""
    from pipelines import teacher_dump

    root.mkdir(parents=True, exist_ok=True)
    (root / "p.txt").write_text("".join(f"{c}\n" for c in captions))
    teacher_dump.run(dump_argv(root / "p.txt", root / "out", **overrides))
    return str(root / "out")


@pytest.fixture
def make_dump(tmp_path_factory):
    """``make_dump(captions=..., **overrides) -> dump folder``: a fresh dump of the tiny teacher per call, with
    ``DUMP_DEFAULTS`` overridden by flag name (``num_inference_steps=8``, ``save_images=True``, ``feature_layers=""``)."""
    def make(captions=SCENE_CAPTIONS, **overrides) -> str:
        return run_dump(tmp_path_factory.mktemp("dump"), captions, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_dump(tmp_path_factory):
    """The ``tiny`` teacher's dump of 16 captions (4 teacher steps, 4 shards of 4 samples, block outputs of
    mid_block and up_blocks.0 at 2 steps): the trainer's tests' data."""
    return run_dump(tmp_path_factory.mktemp("dump"))


def hand_checkpoint(root, scheduler, *, schema_version: int, dump_recipe: dict, preset: str, recipe: dict,
                    step: int) -> str:
    """A checkpoint laid out as ``distill train`` writes it (config.json, student/, ema/) for a seeded ``preset``
    student, beside a dump that is its dataset.json only (``scheduler`` after ``set_timesteps``: its class,
    config and timesteps; ``dump_recipe`` the dump's recipe); -> the run folder ``root/run``."""
    import json

    import torch

    from students.models.unet import build_unet

    dump = root / "dump"
    dump.mkdir(parents=True)
    (dump / "dataset.json").write_text(json.dumps(dict(
        schema_version=schema_version, recipe=dump_recipe, recipe_hash="0", shards=[],
        timesteps=[float(t) for t in scheduler.timesteps], scheduler_class=type(scheduler).__name__,
        scheduler_config=dict(scheduler.config), prediction_type=recipe["prediction_type"])))
    ckpt = root / "run" / "checkpoints" / f"step-{step:07d}"
    torch.manual_seed(0)
    unet = build_unet(preset)
    for name in ("student", "ema"):
        unet.save_pretrained(ckpt / name)
    (ckpt / "config.json").write_text(json.dumps(dict(
        step=step, train=dict(data=str(dump), preset=preset, decoder=None), recipe=recipe)))
    return str(root / "run")


def flow_checkpoint(root, guidance_scale: float = 5.0) -> str:
    """``hand_checkpoint`` of a seeded ``tiny_sd3`` student, step-distilled with ``flow_step`` to 2 steps from a
    4-step dump of tiny-sd3 (SD3's scheduler at shift 3, the Euler timesteps it sampled with,
    ``guidance_scale``, 128 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from teachers.configs import sd3_scheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**sd3_scheduler())
    scheduler.set_timesteps(4)
    recipe = dict(teacher="tiny-sd3", scheduler="flow-euler", num_inference_steps=4, guidance_scale=guidance_scale,
                  height=128, width=128)
    return hand_checkpoint(root, scheduler, schema_version=3, dump_recipe=recipe, preset="tiny_sd3", step=2,
                           recipe=dict(name="flow_step", step_weight=1.0, student_steps=2, prediction_type="flow"))


_NO_TORCH = r"""
import sys
from diffusion_distill.cli import main
rc = main(["generate", "--onnx", sys.argv[1], sys.argv[2], "--seed", "1", "--output", sys.argv[3], "--threads", "1"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "torchvision"))
print("RC", rc, "HEAVY", heavy)
"""


def generate_without_torch(folder: str, caption: str, png: str) -> None:
    """``distill generate --onnx FOLDER CAPTION --seed 1`` in a fresh interpreter: it succeeds and imports none
    of torch, diffusers, transformers, torchvision."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, folder, caption, png], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RC 0 HEAVY []" in proc.stdout, proc.stdout


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("gpu_suite")``: a ``benchmarks/`` script imported by path (benchmarks/ is scripts, not a
    package), for tests that check a benchmark's own logic."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
