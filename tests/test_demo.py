"""``distill demo`` resumes: killed mid-training and re-run with the same flags, it finishes with the same
metrics as an uninterrupted run; a re-run with other flags is refused in one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

CAPTIONS = [f"a small {c} circle at the centre on a {b} background" for c in ("red", "blue") for b in ("grey", "white")]


def _argv(out, captions):
    return [sys.executable, "-m", "diffusion_distill.demo", "--output", str(out), "--captions", str(captions),
            "--train_steps", "40", "--checkpoint_every", "5", "--eval_images", "4", "--seeds_per_prompt", "1"]


def _quality(out):
    results = json.load(open(os.path.join(out, "eval", "metrics.json")))["results"]
    return {m: {s: {k: r[k] for k in ("adherence", "exact", "frechet_analyser")} for s, r in by.items()}
            for m, by in results.items()}


@pytest.mark.slow  # three demo runs of a few captions: about 3 minutes here
def test_demo_killed_mid_training_resumes_to_the_same_metrics(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")  # one thread: the same arithmetic
    ref = tmp_path / "ref"
    subprocess.run(_argv(ref, captions), env=env, check=True, capture_output=True, timeout=600)
    run = tmp_path / "run"
    proc = subprocess.Popen(_argv(run, captions), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run / "train" / "checkpoints"
    deadline = time.monotonic() + 600
    while not (ckpts.is_dir() and any(n.startswith("step-0000010") and ".tmp-" not in n for n in os.listdir(ckpts))):
        assert proc.poll() is None and time.monotonic() < deadline, "the demo ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "student").exists()  # killed during training: nothing after it ran
    done = subprocess.run(_argv(run, captions), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "continuing the demo" in done.stdout
    assert _quality(run) == _quality(ref)
    other = subprocess.run(_argv(run, captions)[:-2] + ["--seeds_per_prompt", "2"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert other.returncode == 2 and "other settings (seeds_per_prompt)" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


def test_bundled_student_is_intact_and_is_the_4_step_shapes_small():
    """The demo's bundled student: every file as weights.json recorded it, and a loadable shapes_small
    4-step checkpoint of the shapes teacher (the architecture the demo's report names)."""
    import hashlib

    from diffusion_distill.demo import bundled_student
    from students.training.runs import load_student_unet, read_run

    folder = bundled_student()
    meta = json.load(open(os.path.join(folder, "weights.json")))
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest() == digest, name
    run = read_run(folder)
    assert (run.train["preset"], run.train["student_steps"], run.teacher) == ("shapes_small", 4, "shapes")
    unet = load_student_unet(run.files, "raw")
    assert sum(p.numel() for p in unet.parameters()) == 621_412


def test_demo_refuses_two_student_starts_in_one_line(tmp_path):
    from core.errors import UserError
    from diffusion_distill.demo import DemoConfig

    with pytest.raises(UserError, match="both give the student's start"):
        DemoConfig(output=str(tmp_path / "d"), init_from="shapes_small", init_from_teacher="mid_only")
    with pytest.raises(UserError, match="no such run or checkpoint folder"):
        DemoConfig(output=str(tmp_path / "d"), init_from=str(tmp_path / "missing"))


def test_demo_cost_of_the_teacher_is_its_architectures():
    """The report's teacher cost comes from the UNet built from its config (no second weight load): the
    same parameters and MACs as the loaded teacher's UNet."""
    from diffusers import UNet2DConditionModel

    from diffusion_distill import kit
    from diffusion_distill.demo import unet_cost
    from teachers.load import SHAPES_ARCHS, load_teacher
    from teachers.shapes import model as shapes_model

    built = UNet2DConditionModel(**shapes_model.unet_config(SHAPES_ARCHS[kit.TEACHER])).eval()
    loaded = unet_cost(load_teacher(kit.TEACHER).unet, 32)
    assert unet_cost(built, 32) == loaded and loaded["parameters"] > 1e6
