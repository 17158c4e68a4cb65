"""``distill export``: the folder loads with diffusers alone and samples what the project samples."""

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from shards.schema import DatasetInfo
from students.export import folder as export
from students.training import runs as student_runs
from students.distill import inference as student_inference

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [3, 4]

# Runs in a fresh interpreter: project packages are made unimportable (the editable install would
# otherwise provide them), so the folder must carry everything it needs.
LOAD_OUTSIDE = r"""
import importlib.abc, json, os, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"students", "teachers", "filters", "pipelines", "diffusion_distill"}:
            raise ImportError(f"project module {name} must not be needed")
sys.meta_path.insert(0, Block())
import numpy as np, torch
from diffusers import DiffusionPipeline
torch.set_num_threads(1)  # as the test process: same rounding, and no thread oversubscription on a shared CPU
prompts, seeds, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for folder in sys.argv[4:]:
    info = json.load(open(os.path.join(folder, "inference.json")))
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=info["num_inference_steps"], guidance_scale=info["guidance_scale"])
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]
    latents = pipe(prompts, generator=gens(), output_type="latent", **kw).images
    images = pipe(prompts, generator=gens(), output_type="np", **kw).images
    name = os.path.basename(folder)
    np.save(os.path.join(out, name + "-latents.npy"), latents.numpy())
    np.save(os.path.join(out, name + "-images.npy"), (images * 255).round().astype(np.uint8))
    print(name, type(pipe).__name__, type(pipe.unet).__module__, type(pipe.vae).__name__)
"""


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]  # numerics: rerun on AVX2 kernels (CI)


def student_run(tmp_path_factory) -> str:
    """A tiny snapfusion_step run with a TAESD decoder and EMA, checkpoints at steps 1 and 2 (built once per session)."""
    from conftest import dump_argv
    from pipelines import teacher_dump
    from students.training.train import TrainConfig, train

    root = tmp_path_factory.getbasetemp() / "dd-student-run"
    if (root / "done").exists():
        return str(root / "run")
    root.mkdir(exist_ok=True)
    (root / "p.txt").write_text("".join(f"a {c} {s}\n" for c in ("red", "blue") for s in ("circle", "square")))
    teacher_dump.run(dump_argv(root / "p.txt", root / "dump", num_inference_steps=8, batch_size=4, feature_layers="",
                               save_images=True, cpu_threads=1))
    train(TrainConfig(data=str(root / "dump"), output=str(root / "run"), preset="tiny", recipe="snapfusion_step",
                      decoder="tiny", batch_size=2, max_steps=2, warmup_steps=1, checkpoint_every=1, lr=1e-2))
    (root / "done").write_text("")
    return str(root / "run")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    return student_run(tmp_path_factory)


def _xl_checkpoint(run_dir, tmp_path) -> str:
    """The SD run's newest checkpoint with a tiny_xl student in place of its UNet and no decoder."""
    from students.models.unet import build_unet

    ckpt = tmp_path / "xl-ckpt"
    shutil.copytree(student_runs.resolve_checkpoint(run_dir), ckpt)
    shutil.rmtree(ckpt / "decoder")
    torch.manual_seed(0)
    unet = build_unet("tiny_xl")
    for name in ("student", "ema"):
        shutil.rmtree(ckpt / name)
        unet.save_pretrained(ckpt / name)
    return str(ckpt)


@pytest.fixture(scope="module")
def outside(run_dir, tmp_path_factory):
    """Export the SD student and an SDXL-shaped one, then sample both in one fresh interpreter."""
    tmp = tmp_path_factory.mktemp("export")
    sd = export.export(run_dir, str(tmp / "sd"))
    xl_ckpt = _xl_checkpoint(run_dir, tmp)
    xl = export.export(xl_ckpt, str(tmp / "xl"), teacher="tiny-xl")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp / "hf_modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", LOAD_OUTSIDE, json.dumps(PROMPTS), json.dumps(SEEDS), str(tmp), sd, xl],
                          cwd=str(tmp), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(tmp=tmp, sd=sd, xl=xl, xl_ckpt=xl_ckpt, stdout=proc.stdout)


def test_exported_folder_loads_with_diffusers_alone_and_matches_project_sampling(outside, run_dir, tiny_teacher):
    from diffusers import AutoencoderTiny

    from students.training.grid import sample_images
    from students.models.unet import EfficientUNet2DConditionModel

    assert "sd StableDiffusionPipeline diffusers_modules.local.student_unet AutoencoderTiny" in outside["stdout"]
    assert json.load(open(os.path.join(outside["sd"], "model_index.json")))["unet"] == ["student_unet", "EfficientUNet2DConditionModel"]
    info = export.read_inference(outside["sd"])
    assert (info["num_inference_steps"], info["guidance_scale"], info["timesteps_exact"]) == (8, 7.5, True)
    assert info["timesteps"] == info["trained_timesteps"] == [876, 751, 626, 501, 376, 251, 126, 1]
    # the project's own sampling: the teacher pipeline with the student UNet, decoder and scheduler swapped in
    run = student_runs.read_run(run_dir)
    pipe = copy.copy(tiny_teacher.pipe)
    pipe.vae = AutoencoderTiny.from_pretrained(os.path.join(run.checkpoint, "decoder"))
    pipe.scheduler = student_inference.student_scheduler(run.dataset, run.recipe)[0]
    unet = EfficientUNet2DConditionModel.from_pretrained(os.path.join(run.checkpoint, "ema"))
    pipe.unet = unet
    images = sample_images(pipe, PROMPTS, SEEDS, 8, 7.5)
    ours = np.load(outside["tmp"] / "sd-images.npy")
    assert ours.shape == images.shape == (2, 128, 128, 3)
    assert np.abs(ours.astype(int) - images.astype(int)).max() <= 1
    with torch.no_grad():
        latents = pipe(PROMPTS, num_inference_steps=8, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                       output_type="latent").images
    np.testing.assert_allclose(np.load(outside["tmp"] / "sd-latents.npy"), latents.numpy(), atol=1e-4, rtol=1e-4)
    assert float(latents.std()) > 0.1  # a real generation, not zeros
    assert not [n for n in os.listdir(outside["tmp"]) if ".tmp-" in n]  # atomic: no temporary folders left


def test_sdxl_shaped_student_exports_and_loads(outside):
    assert "xl StableDiffusionXLPipeline diffusers_modules.local.student_unet AutoencoderKL" in outside["stdout"]
    run = student_runs.read_run(outside["xl_ckpt"], teacher="tiny-xl")
    pipe, info = export.assemble_pipeline(run)
    assert info["decoder"] == "teacher"
    with torch.no_grad():
        latents = pipe(PROMPTS, num_inference_steps=info["num_inference_steps"], guidance_scale=info["guidance_scale"],
                       generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="latent").images
    np.testing.assert_allclose(np.load(outside["tmp"] / "xl-latents.npy"), latents.numpy(), atol=1e-4, rtol=1e-4)


def test_raw_weights_from_the_newest_checkpoint(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    assert export.main([run_dir, str(tmp_path / "raw"), "--weights", "raw"]) == 0
    info = export.read_inference(str(tmp_path / "raw"))
    assert info["checkpoint"].endswith("step-0000002") and info["weights"] == "raw"
    got = load_file(tmp_path / "raw" / "unet" / "diffusion_pytorch_model.safetensors")
    raw = load_file(os.path.join(info["checkpoint"], "student", "diffusion_pytorch_model.safetensors"))
    ema = load_file(os.path.join(info["checkpoint"], "ema", "diffusion_pytorch_model.safetensors"))
    assert got.keys() == raw.keys() and all(torch.equal(got[k], raw[k]) for k in raw)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert "trust_remote_code=True" in (tmp_path / "raw" / "README.md").read_text()


def _dataset(steps, spacing="leading"):
    from teachers.configs import sd15_scheduler

    config = dict(sd15_scheduler(), timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=False)
    return DatasetInfo(schema_version=2, recipe={"num_inference_steps": steps}, recipe_hash="0" * 16, shards=[],
                       scheduler_class="DDIMScheduler", scheduler_config=config)


@pytest.mark.parametrize("teacher_steps,student_steps", [(8, 8), (16, 8), (40, 8), (32, 8), (50, 8), (4, 8)])
def test_trained_jumps_are_the_trainer_rows(teacher_steps, student_steps):
    from students.distill.batches import rows_for
    from students.distill.recipes import get_recipe

    dataset = _dataset(teacher_steps)
    ts = student_inference.teacher_timesteps(dataset)
    meta = {"recorded_steps": list(range(teacher_steps)), "num_inference_steps": teacher_steps}
    recipe = get_recipe("snapfusion_step", student_steps=student_steps)
    pairs = {rows_for(meta, recipe, 0, 0, f"k{i}") for i in range(400)}
    want = sorted((ts[r], ts[n] if n < teacher_steps else -1) for r, n in pairs)
    got, nxt = student_inference.trained_jumps(dataset, student_steps)
    assert sorted(zip(got, nxt)) == want


@pytest.mark.parametrize("teacher_steps,exact", [(40, True), (16, False), (32, False)])
def test_ddim_scheduler_steps_where_the_student_was_trained(teacher_steps, exact):
    """Checked through DDIMScheduler.step itself: with a zero epsilon, z_prev / z_t = sqrt(abar_prev / abar_t)."""
    dataset = _dataset(teacher_steps)
    scheduler, info = student_inference.student_scheduler(dataset, {"step_weight": 1.0, "student_steps": 8})
    want, want_next = student_inference.trained_jumps(dataset, 8)
    assert info["timesteps_exact"] is exact and info["trained_timesteps"] == want and info["num_inference_steps"] == 8
    abar = scheduler.alphas_cumprod.double()
    final = float(abar[0])  # set_alpha_to_one=False
    z = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    for t, t_next, w, w_next in zip(scheduler.timesteps, info["timesteps"][1:] + [-1], want, want_next):
        out = scheduler.step(torch.zeros_like(z), t, z).prev_sample
        abar_prev = float(out[0, 0, 0, 0]) ** 2 * float(abar[t])
        target = final if t_next < 0 else float(abar[t_next])
        assert abar_prev == pytest.approx(target, rel=1e-6)
        if exact:
            assert (int(t), t_next) == (w, w_next)
        else:
            assert abs(int(t) - w) <= 16 and abs(t_next - w_next) <= 16  # the nearest DDIM configuration


@pytest.mark.parametrize("steps", [3, 8])
def test_leading_offsets_shift_the_offset_zero_timesteps(steps):
    """student_scheduler computes leading spacing at every offset from one scheduler: diffusers' own
    set_timesteps at each offset gives the same timesteps."""
    from diffusers import DDIMScheduler

    base = DDIMScheduler(timestep_spacing="leading", steps_offset=0)
    base.set_timesteps(steps)
    ratio = 1000 // steps
    for offset in range(ratio + 1):
        sched = DDIMScheduler(timestep_spacing="leading", steps_offset=offset)
        sched.set_timesteps(steps)
        assert [int(t) for t in sched.timesteps] == [int(t) + offset for t in base.timesteps]


def test_teacher_timesteps_keep_the_dumps_exact_floats():
    """Euler with linspace spacing or Karras sigmas runs at non-integer timesteps (issue 19): the
    export's jumps are the dump's floats, never int(t)."""
    dataset = dataclasses.replace(_dataset(4), timesteps=[799.2, 599.4, 399.6, 199.8], recorded_steps=[0, 1, 2, 3])
    assert student_inference.teacher_timesteps(dataset) == [799.2, 599.4, 399.6, 199.8]
    got, nxt = student_inference.trained_jumps(dataset, 2)
    assert (got, nxt) == ([799.2, 399.6], [399.6, -1])  # stride 2: exact floats, the final latent as -1


def test_student_without_step_distillation_keeps_the_teacher_sampler():
    scheduler, info = student_inference.student_scheduler(_dataset(20), {"step_weight": 0.0, "student_steps": 8})
    assert type(scheduler).__name__ == "DDIMScheduler" and info["num_inference_steps"] == 20
    assert info["timesteps"] == student_inference.teacher_timesteps(_dataset(20))


def test_bad_inputs_fail_clearly_before_writing(run_dir, tmp_path, capsys):
    def fails(argv, *needles):
        assert export.main(argv) == 2
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err

    fails([str(tmp_path / "nothing"), str(tmp_path / "o1")], "neither a checkpoint folder")
    (tmp_path / "exists").mkdir()
    fails([run_dir, str(tmp_path / "exists")], "exists", "--overwrite")
    fails([run_dir, str(tmp_path / "o2"), "--teacher", "tiny-xl"], "cross_attention_dim", "wrong --teacher")
    fails([run_dir, str(tmp_path / "o3"), "--teacher", "no-such-teacher"], "unknown teacher 'no-such-teacher'")
    moved = tmp_path / "moved"
    shutil.copytree(student_runs.resolve_checkpoint(run_dir), moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["train"]["data"] = str(tmp_path / "gone")
    del cfg["dataset"]  # a checkpoint from before checkpoints carried their dump's dataset.json
    (moved / "config.json").write_text(json.dumps(cfg))
    fails([str(moved), str(tmp_path / "o4")], "pass --data")
    shutil.rmtree(moved / "ema")
    fails([str(moved), str(tmp_path / "o5"), "--data", os.path.join(os.path.dirname(run_dir), "dump")], "no ema/", "--weights raw")
    assert sorted(os.listdir(tmp_path)) == ["exists", "moved"]  # nothing written, no temporary folders left


def test_v_prediction_step_student_grid_equals_its_export_and_export_needs_no_data(run_dir, tmp_path):
    """The training grid samples the student as ``distill export`` will (its own scheduler, trained timesteps,
    v parameterisation, the dump's guidance, its decoder), and the checkpoint describes itself: exporting it
    without ``--data`` gives the same folder, byte for byte, as with it."""
    from PIL import Image

    from shards.loader import dataset_shards, record_pipeline
    from students.training import checkpoint as ckpt
    from students.training.grid import MIN_TILE
    from students.training.train import TrainConfig, train

    dump = os.path.join(os.path.dirname(run_dir), "dump")  # tiny teacher, 8 DDIM steps, leading spacing
    out = tmp_path / "v"
    train(TrainConfig(data=dump, output=str(out), preset="tiny", recipe="snapfusion_step", student_steps=2,
                      prediction_type="v_prediction", decoder="tiny", batch_size=2, max_steps=1, warmup_steps=1,
                      checkpoint_every=1, image_every=1, lr=1e-4, shuffle_buffer=0))
    saved = json.load(open(out / "checkpoints" / "step-0000001" / ckpt.CONFIG))
    assert saved["student"]["prediction_type"] == "v_prediction" and saved["student"]["num_inference_steps"] == 2
    assert saved["dataset"] == json.load(open(os.path.join(dump, "dataset.json")))  # the JSON as the dump wrote it
    from shards.loader import read_dataset_info

    stored, own = student_runs.read_run(str(out)).dataset, student_runs.read_run(str(out), data=dump).dataset
    assert isinstance(stored, DatasetInfo) and stored == own == read_dataset_info(dump)  # read back typed, equal
    assert (out / "checkpoints" / "step-0000001" / "scheduler" / "scheduler_config.json").exists()
    a = export.export(str(out), str(tmp_path / "a"))
    b = export.export(str(out), str(tmp_path / "b"), data=dump)

    def tree(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(root) for f in files}

    assert tree(a) == tree(b)
    info = export.read_inference(a)
    assert (info["num_inference_steps"], info["prediction_type"]) == (2, "v_prediction")
    assert json.load(open(os.path.join(a, "scheduler", "scheduler_config.json")))["prediction_type"] == "v_prediction"
    prompts = [r.caption for _, r in zip(range(4), record_pipeline(dataset_shards(dump)[:1]))]
    seeds = list(range(len(prompts)))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", LOAD_OUTSIDE, json.dumps(prompts), json.dumps(seeds), str(tmp_path), a],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = np.load(tmp_path / "a-images.npy")  # (4, 128, 128, 3): EMA weights, the export's default
    n, h, w, _ = exported.shape
    scale = max(1, -(-MIN_TILE // max(h, w)))
    grid = np.asarray(Image.open(out / "grids" / "step-0000001.png").convert("RGB"))
    ema_row = 2  # rows: teacher, student, EMA
    tiles = np.stack([grid[ema_row * h * scale:(ema_row + 1) * h * scale:scale,
                           110 + i * w * scale:110 + (i + 1) * w * scale:scale] for i in range(n)])
    assert float(exported.std()) > 5  # real images, not a flat field
    # same arithmetic in two processes (one thread each): uint8 rounding of equal floats, at most 1 apart
    assert np.abs(tiles.astype(int) - exported.astype(int)).max() <= 1
