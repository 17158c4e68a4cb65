"""``distill eval`` of a flow teacher (tiny-sd3, SD3's pipeline) and a flow student (``FlowUNetTransformer`` in the
transformer seat): both rows' metrics, the student row's images against its exported pipeline's own, one
guidance for every row (down to the CFG mix inside each step), the latency entry timing the transformer seat
on its real call, and the training grids' teacher row of a flow teacher.

The student is ``conftest.flow_checkpoint``'s, with its dump's guidance planted at 3.25: neither the SD3
pipeline's default (7), the project's fallback (7.5) nor the 5 of the other flow tests, so a row that took
any default would show it.
"""

import json
import re
from unittest import mock

import numpy as np
import pytest
import torch

from students.evaluation import evaluate as E

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]  # numerics: rerun on AVX2 kernels (CI)

GUIDANCE = 3.25  # planted in the student's dump (dataset.json), so in its inference.json
CAPTIONS = ["a red cube on a table", "two blue birds", "a green tree"]
SIZE = 128


@pytest.fixture(scope="module")
def flow_student(tmp_path_factory, one_thread):
    """(run folder, exported folder, captions file) of the planted flow student."""
    from conftest import flow_checkpoint
    from students.export import folder as export

    root = tmp_path_factory.mktemp("flow-eval")
    run = flow_checkpoint(root, guidance_scale=GUIDANCE)
    folder = export.export(run, str(root / "exported"))
    (root / "captions.txt").write_text("".join(f"{c}\n" for c in CAPTIONS))
    return run, folder, str(root / "captions.txt")


@pytest.fixture(scope="module")
def exported_pipe(flow_student):
    """The exported folder as its inference.json says to load it (``load``), without the evaluator's code."""
    from diffusers import DiffusionPipeline

    _, folder, _ = flow_student
    info = json.load(open(f"{folder}/inference.json"))
    assert info["load"] == ("DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, text_encoder_3=None, "
                            "tokenizer_3=None)") and info["guidance_scale"] == GUIDANCE
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_sd3():
    from teachers.load import load_teacher

    return load_teacher("tiny-sd3")


class Capture:
    """A metric that keeps every configuration's images and captions (``reset`` starts the next one)."""

    name = "capture"

    def __init__(self):
        self.runs = []

    def reset(self) -> None:
        self.runs.append([])

    def update(self, images, captions) -> None:
        self.runs[-1].append((images.clone(), list(captions)))

    def compute(self) -> dict:
        return {}


def _cfg(student, captions, out, **kw):
    base = dict(student=student, teacher="tiny-sd3", captions=captions, num_images=3, teacher_steps=(2,), batch_size=2,
                grid_images=0, latency_repeats=0, metrics=(), output=str(out))
    return E.EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def exported_eval(flow_student, tmp_path_factory):
    """``evaluate`` on tiny-sd3 at 2 steps and the exported student at its own 2: CLIP score (random weights),
    a grid of all 3 captions, one timed latency round, and the images of every row (``Capture``)."""
    _, folder, captions = flow_student
    out = tmp_path_factory.mktemp("eval") / "eval"
    capture = Capture()
    payload = E.evaluate(_cfg(folder, captions, out, metrics=("clip",), clip_model="dd-tiny-clip", clip_weights="random",
                              grid_images=3, latency_repeats=1), extra_metrics=[capture], progress=False)
    return payload, capture, out


def _own_images(pipe, steps: int, guidance: float):
    """``pipe`` itself on the evaluation's batches (2 + 1 captions) and seeds (0 + image index)."""
    batches = []
    for start in (0, 2):
        captions = CAPTIONS[start:start + 2]
        gens = [torch.Generator("cpu").manual_seed(start + i) for i in range(len(captions))]
        with torch.inference_mode():
            batches.append(pipe(captions, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                                generator=gens, output_type="pt").images.float())
    return torch.cat(batches)


def test_eval_flow_teacher_and_exported_student_rows_and_the_students_images_are_its_pipelines_own(
        exported_eval, exported_pipe, tiny_sd3):
    from PIL import Image

    from test_report_html import tiles

    payload, capture, out = exported_eval
    results = payload["results"]
    assert {m: set(by) for m, by in results.items()} == {"teacher": {"2"}, "student": {"2"}}  # the student's own 2 steps
    for row in (results["teacher"]["2"], results["student"]["2"]):
        assert set(row) == {"clip_score", "latency_s", "denoiser_latency_s", "images_per_s", "num_images"}, row
        assert all(np.isfinite(row[k]) and row[k] > 0 for k in ("latency_s", "denoiser_latency_s", "images_per_s"))
        assert -1 <= row["clip_score"] <= 1 and row["num_images"] == 3
    assert payload["protocol"]["guidance_scale"] == GUIDANCE  # the student's recorded guidance, for both rows
    assert payload["protocol"]["denoisers"] == {"teacher": "SD3Transformer2DModel", "student": "FlowUNetTransformer"}
    assert payload["student"]["pipeline"] == "StableDiffusion3Pipeline"
    assert json.loads((out / "metrics.json").read_text())["results"] == results
    # every row's images: the teacher's and the exported pipeline's own for the same captions, seeds and batches --
    # the same modules and the same float32 operations in the same order, so equal bit for bit
    (teacher_batches, student_batches) = capture.runs
    assert [c for _, caps in student_batches for c in caps] == CAPTIONS
    got = {"teacher": torch.cat([im for im, _ in teacher_batches]), "student": torch.cat([im for im, _ in student_batches])}
    want = {"teacher": _own_images(tiny_sd3.pipe, 2, GUIDANCE), "student": _own_images(exported_pipe, 2, GUIDANCE)}
    for model in got:
        assert got[model].shape == (3, 3, SIZE, SIZE) and got[model].std() > 0.05
        assert torch.equal(got[model], want[model]), (model, float((got[model] - want[model]).abs().max()))
    assert (got["teacher"] - got["student"]).abs().mean() > 0.05  # two models, not one twice
    assert not torch.equal(want["student"], _own_images(exported_pipe, 2, 5.0))  # the guidance shows in the pixels
    # report and grid: the transformer seat's latency column and panel, each sample with its caption
    report = (out / "report.html").read_text()
    assert re.findall(r'<figure class="plot"><img alt="([^"]+)"', report) == ["quality vs steps", "latency vs steps"]
    assert "<th>denoiser ms / call</th>" in report and "UNet ms / call" not in report
    assert "<td>FlowUNetTransformer</td>" in report and "<td>SD3Transformer2DModel</td>" in report
    shown = tiles(report)
    assert [c for c, _ in shown] == CAPTIONS * 2
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert grid.shape == (2 * SIZE + 44, 110 + 3 * SIZE, 3)
    tile = (got["student"][1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(grid[SIZE:2 * SIZE, 110 + SIZE:110 + 2 * SIZE], tile)  # row 2 (student), column 2


def test_eval_cli_on_the_flow_training_run_makes_the_images_of_its_export(flow_student, exported_eval, exported_pipe,
                                                                          tmp_path, capsys):
    """The checkpoint route (the student assembled from the run with the loaded teacher's text side) from the
    command line: the same rows, the teacher's tiles equal and the student's those of its export up to float32
    rounding -- the two routes load the same weights into modules built two ways, which may order their sums
    differently -- bounded as tests/test_deploy_flow.py bounds a chain of float32 models (``chain_bound``: the
    text encoders once, the UNet once per step, the decoder once), relative to the decoded image's scale, halved
    by the [-1, 1] -> [0, 1] map; a PNG level flips only where that error straddles a rounding boundary.
    An image side past tiny-sd3's position table is one line before any work."""
    from PIL import Image

    from test_deploy_flow import chain_bound

    run, _, captions = flow_student
    argv = ["--teacher", "tiny-sd3", "--student", run, "--captions", captions, "--num_images", "3", "--teacher_steps", "2",
            "--batch_size", "2", "--grid_images", "3", "--latency_repeats", "0", "--metrics", "clip",
            "--clip_model", "dd-tiny-clip", "--clip_weights", "random"]
    assert E.main(argv + ["--output", str(tmp_path / "cli")]) == 0
    data = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert data["protocol"]["guidance_scale"] == GUIDANCE and data["student"]["checkpoint"].endswith("step-0000002")
    assert data["protocol"]["denoisers"] == {"teacher": "SD3Transformer2DModel", "student": "FlowUNetTransformer"}
    for model in ("teacher", "student"):
        row = data["results"][model]["2"]
        assert row["latency_s"] is None and row["denoiser_latency_s"] is None and "unet_latency_s" not in row
        assert -1 <= row["clip_score"] <= 1 and row["num_images"] == 3
    grid = np.asarray(Image.open(tmp_path / "cli" / "grid.png").convert("RGB")).astype(int)
    teacher_batches, student_batches = exported_eval[1].runs
    for r, batches in enumerate((teacher_batches, student_batches)):
        want = (torch.cat([im for im, _ in batches]).permute(0, 2, 3, 1).numpy() * 255).round().astype(int)
        tiles = np.stack([grid[r * SIZE:(r + 1) * SIZE, 110 + i * SIZE:110 + (i + 1) * SIZE] for i in range(3)])
        flips = np.abs(tiles - want)
        if r == 0:
            assert np.array_equal(tiles, want)  # the teacher: one pipeline, loaded once per run the same way
            continue
        transformer, vae = exported_pipe.transformer, exported_pipe.vae
        text = torch.nn.ModuleList([exported_pipe.text_encoder, exported_pipe.text_encoder_2])
        with torch.inference_mode():
            latents = exported_pipe(CAPTIONS, num_inference_steps=2, guidance_scale=GUIDANCE, output_type="latent",
                                    generator=[torch.Generator().manual_seed(i) for i in range(3)]).images
            scale = float(vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample.abs().max())
        bound = chain_bound((text, 1), (transformer.unet, 2), (vae.decoder, 1)) * scale / 2  # in [0, 1] units
        assert bound * 255 < 0.5 and flips.max() <= 1, (flips.max(), bound)
        assert (flips > 0).mean() <= max(2 * bound * 255, 1e-4), ((flips > 0).mean(), bound)
    capsys.readouterr()
    assert E.main(argv + ["--resolution", "512", "--output", str(tmp_path / "big")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "distill eval: error: resolution 512 is over 256 px, the largest image side flow teacher 'tiny-sd3''s "
        "transformer position table covers: pass --resolution 256 or less"]
    assert not (tmp_path / "big").exists()


def _spy_calls():
    """Patch ``StableDiffusion3Pipeline.__call__``: per call, the model in the transformer seat, the guidance it was
    given and, per step, (the seat's output rows, the velocity the scheduler stepped with)."""
    from diffusers import StableDiffusion3Pipeline

    calls, original = [], StableDiffusion3Pipeline.__call__

    def spy(self, *args, **kwargs):
        record = dict(model=type(self.transformer).__name__, guidance=kwargs["guidance_scale"], steps=[])
        outputs = []
        hook = self.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
        step = self.scheduler.step

        def step_spy(model_output, timestep, sample, **kw):
            record["steps"].append((outputs[-1], model_output.clone()))
            return step(model_output, timestep, sample, **kw)

        self.scheduler.step = step_spy
        try:
            return original(self, *args, **kwargs)
        finally:
            hook.remove()
            del self.scheduler.step
            calls.append(record)

    return calls, mock.patch.object(StableDiffusion3Pipeline, "__call__", spy)


@pytest.mark.parametrize("guidance", [None, 1.75])
def test_teacher_and_student_rows_get_the_same_guidance_down_to_the_cfg_mix(flow_student, tmp_path, guidance):
    """No --guidance_scale: the student's recorded 3.25 for the teacher's rows too; --guidance_scale 1.75: that for
    both. Every pipeline call (the latency rounds' and the scored images') gets it, and inside each step the
    velocity the scheduler steps with is the seat's CFG pair mixed at it: v_u + w (v_c - v_u), as SD3's pipeline
    computes it (float32, the same operations), so bit for bit."""
    _, folder, captions = flow_student
    calls, patch = _spy_calls()
    with patch:
        E.evaluate(_cfg(folder, captions, tmp_path / "eval", num_images=2, teacher_steps=(1, 2), guidance_scale=guidance,
                        latency_repeats=1), progress=False)
    w = GUIDANCE if guidance is None else guidance
    by_model = {m: [c for c in calls if c["model"] == m] for m in ("SD3Transformer2DModel", "FlowUNetTransformer")}
    # teacher: 1 and 2 steps, each 2 latency rounds + 1 batch; the student: its 2 steps, the same
    assert [len(c["steps"]) for c in by_model["SD3Transformer2DModel"]] == [1, 1, 1, 2, 2, 2]
    assert [len(c["steps"]) for c in by_model["FlowUNetTransformer"]] == [2, 2, 2] and len(calls) == 9
    assert {c["guidance"] for c in calls} == {w}
    for call in calls:
        for rows, velocity in call["steps"]:
            v_u, v_c = rows.chunk(2)  # the CFG pair: unconditional rows first
            assert len(rows) == 2 * len(velocity) and not torch.equal(v_u, v_c)
            assert torch.equal(velocity, v_u + w * (v_c - v_u)), (call["model"], w)


@pytest.mark.parametrize("model", ["teacher", "student"])
def test_latency_times_one_transformer_seat_call_on_the_pipelines_own_signature(model, tiny_sd3, exported_pipe):
    """A forward hook on the seat (SD3's transformer, or the exported FlowUNetTransformer) sleeps a planted 0.2 s
    per call and records it: per round, the pipeline's 3 calls then one timed call, whose arguments are the four
    the pipeline passes, at the pipeline's shapes and dtypes (the CFG pair); the entry is that one call."""
    import time

    pipe = tiny_sd3.pipe if model == "teacher" else exported_pipe
    seen, delay, steps, repeats = [], 0.2, 3, 2

    def hook(module, args, kwargs):
        seen.append((args, {k: v for k, v in kwargs.items()}))
        time.sleep(delay)

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        speed = E.latency(pipe, steps, GUIDANCE, SIZE, repeats, "cpu")
    finally:
        handle.remove()
    assert set(speed) == {"latency_s", "denoiser_latency_s"}
    assert len(seen) == (repeats + 1) * (steps + 1)
    names = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
    shapes = lambda kw: {k: (tuple(kw[k].shape), kw[k].dtype) for k in names}  # noqa: E731
    for r in range(repeats + 1):
        round_ = seen[r * (steps + 1):(r + 1) * (steps + 1)]
        *inside, (timed_args, timed) = round_
        assert all("joint_attention_kwargs" in kw for _, kw in inside)  # the pipeline's own calls
        assert timed_args == () and set(timed) == set(names)
        assert all(shapes(timed) == shapes(kw) for _, kw in inside), (shapes(timed), shapes(inside[0][1]))
    assert shapes(timed) == {"hidden_states": ((2, 16, 16, 16), torch.float32), "timestep": ((2,), torch.float32),
                             "encoder_hidden_states": ((2, 333, 96), torch.float32),
                             "pooled_projections": ((2, 64), torch.float32)}
    # one sleeping call, not none (the wrong network) and not a pipeline's 3
    assert delay <= speed["denoiser_latency_s"] < delay + 0.35, speed
    assert speed["latency_s"] >= steps * delay


def test_training_grid_teacher_row_of_a_flow_teacher_is_its_own_pipeline(tiny_sd3, tiny_teacher):
    """``teacher_pipeline`` (the training grids' teacher row): tiny-sd3's own transformer with the dump's scheduler,
    sampling what the teacher's pipeline samples; a UNet teacher's row as before (``student_pipeline`` on its UNet)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from students.distill.inference import teacher_pipeline
    from students.training.grid import sample_images

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_sd3.pipe.scheduler.config)  # as the dump saved it
    pipe = teacher_pipeline(tiny_sd3, scheduler)
    assert pipe.transformer is tiny_sd3.pipe.transformer and pipe.scheduler is scheduler
    images = sample_images(pipe, CAPTIONS[:2], [0, 1], 2, GUIDANCE)
    with torch.no_grad():  # the teacher's own pipeline, its own scheduler of that config
        want = tiny_sd3.pipe(CAPTIONS[:2], num_inference_steps=2, guidance_scale=GUIDANCE, output_type="np",
                             generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert images.shape == (2, SIZE, SIZE, 3) and images.std() > 8
    assert np.array_equal(images, (want * 255).round().astype(np.uint8))
    unet_pipe = teacher_pipeline(tiny_teacher, tiny_teacher.pipe.scheduler)
    assert unet_pipe.unet is tiny_teacher.unet and type(unet_pipe) is type(tiny_teacher.pipe)
