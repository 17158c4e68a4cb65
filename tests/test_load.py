"""load_teacher: built-ins, a local diffusers folder, offline hub ids, dtypes."""

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from teachers.load import TeacherError, load_teacher
from teachers.sampler import SampleRequest, SamplerConfig, sample_trajectories

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)


def test_tiny_is_the_same_model_every_time(tiny_teacher):
    again = load_teacher("tiny")
    for (n, a), (_, b) in zip(tiny_teacher.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), n
    assert tiny_teacher.default_resolution == 128 and tiny_teacher.vae_scale_factor == 8


def test_local_folder_loads_the_same_pipeline(tiny_xl_teacher, tmp_path):
    tiny_xl_teacher.pipe.save_pretrained(tmp_path / "xl", safe_serialization=True)
    loaded = load_teacher(str(tmp_path / "xl"))
    assert loaded.is_xl and type(loaded.pipe).__name__ == "StableDiffusionXLPipeline"
    cfg = SamplerConfig(num_inference_steps=2, feature_layers=())
    req = [SampleRequest("a-s0", "a cat", 5)]
    a, _ = sample_trajectories(tiny_xl_teacher, req, cfg)
    b, _ = sample_trajectories(loaded, req, cfg)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ref, got = getattr(tiny_xl_teacher.pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    # Same weights; transformers may pick another attention kernel for a loaded model, and float32
    # kernels differ by a few ulps per op between kernel paths (AVX2 / AVX-512): ~1e-5 of the scale
    # per UNet call through ~20 layers, times up to 1 + 2w from CFG, per step. Measured 1.2e-5
    # absolute on an AVX2 machine; a different weight or input moves the latents by O(1).
    w, steps = a[0].guidance_scale, cfg.num_inference_steps
    scale = max(1.0, float(np.abs(a[0].latents).max()))
    np.testing.assert_allclose(a[0].latents, b[0].latents, rtol=0, atol=steps * (1 + 2 * w) * 1e-5 * scale)


def test_offline_hub_id_fails_fast_with_a_clear_message():
    start = time.monotonic()
    with pytest.raises(TeacherError) as err:
        load_teacher("stable-diffusion-v1-5/stable-diffusion-v1-5", local_files_only=True)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "folder" in msg


def test_offline_hub_id_from_the_cli_is_one_line_not_a_traceback(tmp_path):
    # Without HF_HUB_OFFLINE the loader probes the hub itself (closed network here: fails within seconds).
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    code = "import sys; from teachers.load import load_teacher, TeacherError\n" \
           "try: load_teacher('someorg/somemodel')\nexcept TeacherError as e: print(e); sys.exit(3)"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "someorg/somemodel" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60  # includes interpreter and torch import


def test_unknown_spec_and_bad_dtype_name_the_value():
    with pytest.raises(TeacherError, match="unknown teacher 'sd99'"):
        load_teacher("sd99")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_teacher("tiny", dtype="float8")


def test_half_precision_dtypes_apply_to_every_component():
    t = load_teacher("tiny", dtype="bfloat16")
    assert {p.dtype for p in t.pipe.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in t.pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in t.pipe.vae.parameters()} == {torch.bfloat16}


def test_resolve_teacher_finds_a_spec_without_loading_weights(tmp_path, monkeypatch):
    from teachers.load import resolve_teacher

    assert resolve_teacher("tiny") == "tiny"
    (tmp_path / "pipe").mkdir()
    with pytest.raises(TeacherError, match="no model_index.json"):
        resolve_teacher(str(tmp_path / "pipe"))
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert resolve_teacher(str(tmp_path / "pipe")) == str(tmp_path / "pipe")  # no unet weights needed
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(TeacherError, match="not a Stable Diffusion"):
        resolve_teacher(str(tmp_path / "pipe"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(TeacherError, match="'org/name' is not in the local hub cache"):
        resolve_teacher("org/name")
    with pytest.raises(TeacherError, match="unknown teacher 'sd99'"):
        resolve_teacher("sd99")
