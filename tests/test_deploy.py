"""``distill export --format onnx`` and ``distill generate --onnx``: parity per model and for the whole
pipeline, deploy.json round trip, the torch-free generator, located conversion failures, fp16 overflow."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from students.export import deploy, ondevice, onnx_convert

CAPTION = "a small red circle at the top left on a white background"


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]  # numerics: rerun on AVX2 kernels (CI)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    """A checkpoint laid out as ``distill train`` writes it (config.json, student/, ema/) for a seeded ``shapes``
    student, step-distilled to 4 steps from a 32-step dump of the shapes teacher (its dataset.json only)."""
    from diffusers import DDIMScheduler

    from conftest import hand_checkpoint
    from teachers.shapes.model import scheduler_config

    scheduler = DDIMScheduler(**scheduler_config())
    scheduler.set_timesteps(32)
    recipe = dict(teacher="shapes", num_inference_steps=32, guidance_scale=6.0, height=32, width=32)
    return hand_checkpoint(tmp_path_factory.mktemp("ckpt"), scheduler, schema_version=2, dump_recipe=recipe,
                           preset="shapes", step=3, recipe=dict(name="snapfusion_step", step_weight=1.0,
                                                                student_steps=4, prediction_type="epsilon"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """``distill export RUN OUT --format onnx``, the command line itself."""
    from diffusion_distill.cli import main

    folder = str(tmp_path_factory.mktemp("deploy") / "onnx")
    assert main(["export", checkpoint, folder, "--format", "onnx"]) == 0
    return folder, ondevice.read_manifest(folder)


@pytest.fixture(scope="module")
def shapes_pipe(checkpoint):
    """The PyTorch pipeline the export came from: the shapes teacher with the student UNet and its scheduler."""
    from students.export import folder as export
    from students.training import runs as student_runs

    pipe, info = export.assemble_pipeline(student_runs.read_run(checkpoint))
    assert info["timesteps"] == [999, 749, 499, 249] and info["guidance_scale"] == 6.0
    return pipe, info


def test_every_model_matches_pytorch_within_the_bound_of_its_arithmetic(exported, shapes_pipe):
    folder, manifest = exported
    for component in ondevice.COMPONENTS:
        for precision in ondevice.PRECISIONS:
            spec = manifest.model(component, precision)
            assert os.path.isfile(os.path.join(folder, spec.file))
            for name, err, rel, bound in spec.parity:
                assert 0 < rel <= bound, (component, precision, name, rel, bound)
                if precision == "fp32":
                    assert rel <= 1e-4 and bound <= 1e-4  # the target for fp32
                else:
                    assert rel > manifest.model(component, "fp32").parity[0][2]  # fp16 really is fp16
    # fresh inputs (another timestep and noise than the export's) through the fp32 UNet
    pipe, info = shapes_pipe
    unet = [c for c in deploy.pipeline_components(pipe, info, prompt=CAPTION, seed=7) if c.name == "unet"][0]
    unet = onnx_convert.Component(**dict(vars(unet), inputs=(unet.inputs[0] * 3, torch.full((2,), 999.0), unet.inputs[2])))
    spec = manifest.model("unet", "fp32")
    ((_, err, rel),) = onnx_convert.parity(onnx_convert.session(os.path.join(folder, spec.file)), unet)
    assert rel <= onnx_convert.error_bound(unet.module, "fp32") and err > 0
    assert [(t.name, t.shape, t.dtype) for t in spec.inputs] == [
        ("sample", (2, 4, 8, 8), "float32"), ("timestep", (2,), "float32"), ("encoder_hidden_states", (2, 77, 64), "float32")]
    assert manifest.model("unet", "fp16").inputs[0].dtype == "float16"
    assert (manifest.height, manifest.width, manifest.latent_shape, manifest.cfg_batch) == (32, 32, (1, 4, 8, 8), 2)


def test_deploy_json_round_trips_and_rejects_bad_fields(exported, tmp_path):
    folder, manifest = exported
    data = json.loads(json.dumps(ondevice.manifest_to_dict(manifest)))
    assert ondevice.manifest_from_dict(data) == manifest
    assert manifest.scheduler.timesteps == (999, 749, 499, 249) and manifest.guidance_scale == 6.0
    assert manifest.source["checkpoint"].endswith("step-0000003") and manifest.source["preset"] == "shapes"
    assert manifest.tokenizer.files == ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")
    for bad, says in [(dict(data, extra=1), "unknown fields ['extra']"),
                      ({k: v for k, v in data.items() if k != "scheduler"}, "lacks ['scheduler']"),
                      (dict(data, schema_version=99), "schema_version 99"),
                      (dict(data, models={"unet": data["models"]["unet"]}), "no 'text_encoder'")]:
        with pytest.raises(ondevice.DeployError, match=says.replace("[", r"\[").replace("]", r"\]")):
            ondevice.manifest_from_dict(bad)
    with pytest.raises(ondevice.DeployError, match="no deploy.json"):
        ondevice.read_manifest(str(tmp_path))


SCHEMA_1_FIELDS = {"schema_version", "format", "pipeline", "height", "width", "latent_shape", "guidance_scale",
                   "negative_prompt", "cfg_batch", "noise", "postprocess", "scheduler", "tokenizer", "models", "source"}
DDIM_FIELDS = {"name", "prediction_type", "timesteps", "alpha_prod_t", "alpha_prod_t_prev", "sample_coef",
               "model_output_coef", "clip_sample", "clip_sample_range", "init_noise_sigma"}


def test_a_unet_students_deploy_json_is_still_schema_1_with_the_ddim_rule(exported):
    """Flow folders (tests/test_deploy_flow.py) write schema 2; a UNet student's manifest keeps schema 1's fields
    exactly, so a generator that reads only schema 1 still runs it."""
    from diffusers import DDIMScheduler

    from teachers.shapes.model import scheduler_config

    folder, manifest = exported
    with open(os.path.join(folder, ondevice.DEPLOY_FILE), encoding="utf-8") as f:
        data = json.load(f)
    assert data["schema_version"] == ondevice.DDIM_SCHEMA_VERSION == 1 and not manifest.is_flow
    assert set(data) == SCHEMA_1_FIELDS and set(data["scheduler"]) == DDIM_FIELDS
    want = deploy.scheduler_spec(DDIMScheduler(**scheduler_config()), 4)
    assert data["scheduler"]["name"] == "DDIMScheduler" and data["scheduler"]["prediction_type"] == "epsilon"
    assert tuple(data["scheduler"]["sample_coef"]) == want.sample_coef and data["scheduler"]["timesteps"] == [999, 749, 499, 249]
    assert manifest.latent_decode is None and manifest.tokenizer_2 is None
    assert ondevice.decoder_input(np.ones((1, 4, 8, 8), np.float32), manifest).tolist() == np.ones((1, 4, 8, 8)).tolist()


@pytest.mark.parametrize("prediction_type,clip", [("epsilon", False), ("v_prediction", False), ("epsilon", True)])
def test_numpy_ddim_step_is_diffusers_step(prediction_type, clip):
    from diffusers import DDIMScheduler

    from teachers.shapes.model import scheduler_config

    scheduler = DDIMScheduler(**dict(scheduler_config(), prediction_type=prediction_type, clip_sample=clip))
    spec = deploy.scheduler_spec(scheduler, 4)
    rng = np.random.default_rng(0)
    for i, t in enumerate(scheduler.timesteps):
        sample, output = rng.standard_normal((2, 4, 8, 8), dtype=np.float32), rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
        want = scheduler.step(torch.from_numpy(output), t, torch.from_numpy(sample)).prev_sample.numpy()
        got = ondevice.ddim_step(output, sample, i, spec)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=16 * 2.0 ** -24 * scale, rtol=0)
        if not clip:  # the linear form in deploy.json is the same update
            linear = spec.sample_coef[i] * sample.astype(np.float64) + spec.model_output_coef[i] * output
            np.testing.assert_allclose(linear, want, atol=64 * 2.0 ** -24 * scale, rtol=0)


def test_onnx_pipeline_makes_the_pytorch_pipelines_image(exported, shapes_pipe):
    folder, manifest = exported
    pipe, info = shapes_pipe
    onnx_pipe = ondevice.OnnxPipeline(folder, threads=1)
    ids = onnx_pipe.token_ids(CAPTION)
    want_ids = pipe.tokenizer(["", CAPTION], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.tolist() == want_ids[1:]  # the prompt's row: the negative row was encoded once, at load
    with torch.no_grad():  # and it is the pipeline's own unconditional embedding
        negative = pipe.text_encoder(torch.tensor(want_ids[:1]))[0].numpy()
        prompt = pipe.text_encoder(torch.tensor(want_ids[1:]))[0].numpy()
    scale = max(np.abs(negative).max(), np.abs(prompt).max())
    np.testing.assert_allclose(onnx_pipe.encode(CAPTION), np.concatenate([negative, prompt]), atol=1e-4 * scale, rtol=0)
    images = {}
    for seed in (0, 1):
        noise = ondevice.initial_noise(seed, manifest)
        with torch.no_grad():
            ref = pipe(CAPTION, latents=torch.from_numpy(noise), num_inference_steps=4, guidance_scale=6.0,
                       height=info["height"], width=info["width"], output_type="np").images[0]
        ref = (ref * 255).round().astype(np.uint8)
        images[seed] = got = onnx_pipe(CAPTION, seed=seed)
        assert got.shape == ref.shape == (32, 32, 3) and ref.std() > 8  # a real image, not a constant
        assert np.abs(got.astype(int) - ref.astype(int)).mean() <= 1.0  # at most 1/255 on average (issue target)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 4  # the seed matters
    half = ondevice.OnnxPipeline(folder, precision="fp16", threads=1)(CAPTION, seed=0)
    assert np.abs(half.astype(int) - images[0].astype(int)).mean() < 4


def test_generate_cli_writes_the_png_without_importing_torch(exported, tmp_path):
    from PIL import Image

    from conftest import generate_without_torch

    folder, _ = exported
    png = str(tmp_path / "out.png")
    generate_without_torch(folder, CAPTION, png)
    image = np.asarray(Image.open(png))
    assert np.array_equal(image, ondevice.OnnxPipeline(folder, threads=1)(CAPTION, seed=1))


def test_generate_on_a_truncated_onnx_model_is_one_line(exported, tmp_path, capsys):
    """onnxruntime's InvalidProtobuf traceback: now the file, the component and what to do, before any output."""
    import shutil

    folder, manifest = exported
    cut = str(tmp_path / "cut")
    shutil.copytree(folder, cut)
    unet = os.path.join(cut, manifest.model("unet", "fp32").file)
    with open(unet, "r+b") as f:
        f.truncate(os.path.getsize(unet) // 2)
    png = tmp_path / "i.png"
    assert ondevice.main(["--onnx", cut, CAPTION, "--output", str(png)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distill generate: error: {unet}: the fp32 unet is not a loadable "
                                                   "ONNX model ("), lines
    assert lines[0].endswith("re-export it (distill export --format onnx)") and not png.exists()


class FourierMix(torch.nn.Module):
    """A block using an operator the TorchScript ONNX exporter does not have (aten::fft_fft)."""

    def forward(self, x):
        return x + torch.fft.fft(x).real * 0


def test_a_conversion_failure_names_the_block_and_the_operator(shapes_pipe, tmp_path):
    pipe, info = shapes_pipe
    unet = copy.deepcopy(pipe.unet)
    attention = next(name for name, m in unet.named_modules() if type(m).__name__ == "EfficientAttention")
    parent = unet.get_submodule(attention)
    child, linear = next((n, m) for n, m in parent.named_children() if isinstance(m, torch.nn.Linear))
    setattr(parent, child, torch.nn.Sequential(linear, FourierMix()))  # deep inside the UNet, still runs in torch
    component = [c for c in deploy.pipeline_components(pipe, info) if c.name == "unet"][0]
    component.module.unet = unet
    with pytest.raises(ondevice.DeployError) as err:
        onnx_convert.export_model(component, str(tmp_path / "u.onnx"))
    message = str(err.value)
    assert f"block unet.{attention}.{child}.1 (FourierMix) uses aten::fft_fft" in message, message
    assert message.startswith("cannot convert the unet to ONNX") and "\n" not in message


def test_fp16_overflow_is_kept_in_fp32_and_named(tmp_path):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    module = torch.nn.Sequential(block, torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():
        block[0].weight.mul_(1e5)  # outputs about 1e5, past float16's 65504; the LayerNorm brings them back
    x = torch.randn(3, 8)
    component = onnx_convert.Component("toy", module, (x,), ("x",), ("y",))
    with torch.no_grad():
        assert not torch.isfinite(onnx_convert.fp16_module(module, [])(x.half())).all()  # plain fp16 breaks
    spec = onnx_convert.convert(component, str(tmp_path), "fp16")
    assert spec.kept_fp32 == ("0",) and [name for name, _ in spec.overflows] == ["0.0"] and spec.overflows[0][1] > 65504
    assert spec.inputs[0].dtype == "float16" and spec.file == "toy.fp16.onnx"
    ((_, err, rel, bound),) = spec.parity
    assert rel <= bound and np.isfinite(err)
    with torch.no_grad():
        module[1].weight.mul_(1e6)  # now the model's own output overflows: the fp16 variant is the fp32 model
    spec = onnx_convert.convert(component, str(tmp_path), "fp16")
    assert spec.kept_fp32 == ("",) and spec.file == "toy.fp32.onnx" and spec.inputs[0].dtype == "float32"
    assert {name for name, _ in spec.overflows} == {"0.0", "1", ""}


def test_format_flag(tmp_path, capsys):
    import importlib.util

    from diffusion_distill.cli import main

    for fmt, package in (("coreml", "coremltools"), ("executorch", "executorch")):
        if importlib.util.find_spec(package) is None:  # not a dependency: one line naming it
            assert main(["export", "ckpt", str(tmp_path / "o"), "--format", fmt]) == 2
            line = capsys.readouterr().err.strip()
            assert line.startswith(f"distill export: error: --format {fmt} needs {package}==") and "\n" not in line
    assert main(["export", "ckpt", str(tmp_path / "o"), "--format=tflite"]) == 2
    assert "--format 'tflite' is not one of diffusers|onnx|coreml|executorch" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "o"), "--format", "onnx"]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err
    assert main(["generate", "--onnx", str(tmp_path), "a caption"]) == 2
    assert "has no deploy.json" in capsys.readouterr().err


@pytest.mark.slow  # minutes on 2 cores; executorch is an optional extra, absent from the default environment
def test_executorch_export_runs_in_its_runtime_within_the_bound(checkpoint, tmp_path):
    pytest.importorskip("executorch.extension.pybindings.portable_lib", reason="executorch is an optional extra")
    from diffusion_distill.cli import main

    assert main(["export", checkpoint, str(tmp_path / "et"), "--format", "executorch"]) == 0
    manifest = ondevice.read_manifest(str(tmp_path / "et"))
    assert manifest.format == "executorch"
    for component in ondevice.COMPONENTS:
        for precision in ondevice.PRECISIONS:
            spec = manifest.model(component, precision)
            assert spec.file.endswith(".pte") and os.path.getsize(tmp_path / "et" / spec.file) > 0
            ((_, err, rel, bound),) = spec.parity
            assert 0 < rel <= bound, (component, precision, rel, bound)
    with pytest.raises(ondevice.DeployError, match="holds executorch models"):
        ondevice.OnnxPipeline(str(tmp_path / "et"))


@pytest.mark.slow  # coremltools is an optional extra, absent from the default environment
def test_coreml_export_passes_coremltools_spec_checks(checkpoint, tmp_path):
    pytest.importorskip("coremltools", reason="coremltools is an optional extra")
    from diffusion_distill.cli import main

    assert main(["export", checkpoint, str(tmp_path / "cm"), "--format", "coreml"]) == 0
    manifest = ondevice.read_manifest(str(tmp_path / "cm"))
    unet = manifest.model("unet", "fp16")
    assert unet.file == "unet.fp16.mlpackage" and os.path.isdir(tmp_path / "cm" / unet.file) and unet.parity == ()
    assert [(t.name, t.shape) for t in unet.inputs] == [("sample", (2, 4, 8, 8)), ("timestep", (2,)),
                                                       ("encoder_hidden_states", (2, 77, 64))]
    assert manifest.model("text_encoder", "fp32").inputs[0].dtype == "int32"
