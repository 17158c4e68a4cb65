"""``distill demo --output DIR``: the whole pipeline end to end on 2 CPU cores, in minutes.

Bundled shapes-world captions (training-split scenes only) -> the curation job (caption rules, exact
dedup) -> the teacher dump with the ``shapes`` teacher on DirectRunner (full DDIM trajectories, images)
-> step distillation of a 4-step student -> export to a diffusers folder -> evaluation of the teacher
and the exported student on held-out scenes no student dump holds (prompt adherence and Frechet
distance from the shapes analyser, latency), with the student's cost beside its quality ->
``DIR/report.html`` with the grids and the numbers. Every stage is the project's own job, called as a
user would call it; each prints its progress.

The student by default is the ``shapes_small`` 4-step student (0.28x the teacher UNet's parameters,
0.34x its MACs) trained once here by ``benchmarks/shapes_small_seed.sh 0`` (6,000 steps, about 20
minutes on 2 cores) and bundled (``diffusion_distill/data/students/shapes_small_s4``): the demo fine-tunes
it on its own dump for ``--train_steps`` with ``--init_from``, so the training stage is real but fits the
demo's minutes. ``--init_from ''`` with ``--init_from_teacher mid_only --student_steps 8`` gives the
older demo's teacher-cut student; ``--init_from ''`` alone the ``shapes`` preset from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from importlib import resources
from typing import TYPE_CHECKING

from diffusion_distill import kit
from core.errors import UserError, run_main
from core.options import differing_fields, option, parse

if TYPE_CHECKING:
    from shards.schema import DatasetInfo

INIT_FROM_TEACHER = "mid_only"  # the teacher cut of the older demo: the best row of benchmarks/ablation.py
BUNDLED_STUDENT = "shapes_small"  # --init_from's default: the bundled trained student (bundled_student())
STUDENT_STEPS = 4  # the bundled student's step count


def bundled_student() -> str:
    """The checkpoint folder of the bundled ``shapes_small`` 4-step student (``weights.json`` says how it was made)."""
    return str(resources.files("diffusion_distill") / "data" / "students" / "shapes_small_s4")


def _eval_captions(path: str, n: int) -> str:
    """``n`` captions cycling over the held-out scenes (``teachers.shapes.world``): no student dump holds them
    (the bundled captions are training-split scenes only); the ``shapes`` teacher itself saw them."""
    from teachers.shapes import world

    return world.write_cycled_captions(path, n, "heldout")


def unet_cost(unet, size: int) -> dict:
    """Parameters and MACs of one UNet call on the CFG pair (batch 2) at ``size`` px (FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from students.cost import profile

    args, kwargs = profile.make_inputs("sd15", unet, 2, size, "cpu", "float32")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        profile.forward("sd15", unet, args, kwargs)
    return {"parameters": sum(p.numel() for p in unet.parameters()), "macs": counter.get_total_flops() / 2}


def _loss_plot(run_dir: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "losses.jsonl")
    if not os.path.isfile(path):
        return None
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.set_title("student training loss")
    out = os.path.join(run_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _figure(path: str | None, caption: str):
    from core import report_html as R

    if not path or not os.path.isfile(path):
        return R.note(f"{caption}: not there")
    with open(path, "rb") as f:
        return R.figure(f.read(), caption, alt=caption)


def describe_student(init_from_teacher: str | None, student_steps: int, init_from: str | None = None) -> str:
    if init_from:
        what = ("the bundled shapes_small student (trained here by benchmarks/shapes_small_seed.sh 0)"
                if os.path.abspath(init_from) == os.path.abspath(bundled_student()) else f"the student of {init_from}")
        return f"{what}, fine-tuned on this dump, step-distilled for {student_steps} steps"
    if init_from_teacher:
        return (f"the teacher's own UNet cut {init_from_teacher} and started from its weights "
                f"(BK-SDM-style teacher initialisation), step-distilled for {student_steps} steps")
    return f"the shapes preset from scratch, step-distilled for {student_steps} steps"


def write_report(out: str, curated: dict, dataset: DatasetInfo, metrics: dict, seconds: dict,
                 student: str = "the shapes preset, step-distilled for 8 steps", cost: dict | None = None) -> str:
    """``OUT/report.html`` through the project's report template (``core.report_html``)."""
    from core import report_html as R

    nan = float("nan")
    rows = []
    cost = cost or {}
    base = cost.get("teacher")
    for model, by_steps in metrics["results"].items():
        c = cost.get(model)
        ratio = (lambda k: R.num(c[k] / base[k], ".2f") if c and base else None)
        for steps, r in by_steps.items():
            rows.append([model, int(steps),
                         f"{r.get('adherence', nan):.3f} ± {r.get('adherence_se', nan):.3f}",
                         R.num(r.get("exact", nan), ".3f"), R.num(r.get("frechet_analyser", nan), ".2f"),
                         R.num((r.get("latency_s") or nan) * 1000, ".1f"), ratio("parameters"), ratio("macs"),
                         R.num((r.get("unet_latency_s") or nan) * 1000, ".2f")])
    totals = dataset.totals
    funnel = (f"captions in {curated['input']} = kept {curated['kept']} + filtered {curated['filtered']} + duplicate "
              f"{curated['duplicate']} + rejected {curated['rejected']}; dump: {totals['samples_written']} samples written, {totals['samples_rejected']} "
              f"rejected, {totals['bytes'] / 2**20:.1f} MiB")
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    protocol = metrics["protocol"]
    page = R.render("diffusion-distill demo", [
        R.section("Funnel", R.text(funnel)),
        R.section("Quality and speed", R.text(
            "Adherence: fraction of attributes (shape, colour, size, position, background) the analyser reads as the "
            "caption says; exact: all five right; Frechet: analyser-feature distance to rendered truth (lower is "
            f"better). {protocol['num_images']} captions of held-out scenes (no student dump holds them; the teacher "
            "saw them), the same seeds for every row; adherence ± its standard error over images. Cost: the UNet's "
            "parameters and MACs against the teacher's, and one UNet call on the CFG pair (PyTorch eager, this "
            "machine)."),
            R.table(["model", "steps", "adherence", "exact", "Frechet (analyser) ↓", "latency ms/img ↓",
                     "UNet params", "UNet MACs", "UNet ms/call ↓"], rows)),
        R.section("Teacher and student, same captions and seeds",
                  _figure(os.path.join(out, "eval", "grid.png"),
                          "a row per model and step count, each column's caption under it (the evaluation report "
                          "shows each image with its caption)")),
        R.section("Training", _figure(_loss_plot(os.path.join(out, "train")), "student training loss per step")),
        R.section("Stages", R.text(f"{timing}. Dataset in dump/, student in student/."),
                  R.links([("curate/report.html", "curation report"), ("eval/report.html", "evaluation report"),
                           ("eval/metrics.json", "evaluation metrics.json")])),
    ], lead=[f"Teacher: shapes (trained here; DDIM, trailing spacing, guidance {protocol['guidance_scale']}). "
             f"Student: {student}, exported to a diffusers folder. Every row at the dump's guidance, on the same "
             "captions and seeds."])
    path = os.path.join(out, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


DEMO_JSON = "demo.json"  # the settings of the demo in a folder: a re-run continues it only with the same ones


def _settings_guard(output: str, settings: dict) -> None:
    """A re-run into a folder continues the demo there only with the same settings (one line otherwise)."""
    path = os.path.join(output, DEMO_JSON)
    if os.path.isfile(path):
        found = json.load(open(path, encoding="utf-8"))
        differ = differing_fields(found, settings)
        if differ:
            raise UserError(f"{output!r} holds a demo run with other settings ({', '.join(differ)}): re-run with "
                            "the same flags to continue it, or pass a new --output")
        print(f"continuing the demo in {output} (each stage resumes where it stopped)", flush=True)
        return
    if os.path.isdir(output) and os.listdir(output):
        raise UserError(f"--output {output!r} is a folder that holds something else than a demo run: pass a new one")
    os.makedirs(output, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, path)


def _done(path: str) -> dict | None:
    return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None


def run(output: str, *, train_steps: int = 200, seeds_per_prompt: int = 2, eval_images: int = 96,
        student_steps: int = STUDENT_STEPS, init_from_teacher: str | None = None, captions: str | None = None,
        checkpoint_every: int = 50, init_from: str | None = BUNDLED_STUDENT) -> str:
    """Every stage of the demo into ``output``. Re-running the same call into the same folder continues it:
    finished stages are read back, the dump job resumes its shards, training resumes from its newest
    checkpoint (every ``checkpoint_every`` steps, exactly: the trainer restores every RNG), export and
    evaluation rerun only when their outputs are missing."""
    from shards.schema import read_dataset_info
    from students.evaluation.evaluate import EvalConfig, evaluate
    from students.export.folder import export
    from students.training.checkpoint import checkpoints
    from teachers.shapes.analyser import Adherence, AnalyserFrechet, load_analyser

    captions = captions or kit.bundled_captions()
    if init_from == BUNDLED_STUDENT:
        init_from = bundled_student()
    _settings_guard(output, dict(train_steps=train_steps, seeds_per_prompt=seeds_per_prompt, eval_images=eval_images,
                                 student_steps=student_steps, init_from_teacher=init_from_teacher,
                                 captions=os.path.abspath(captions), checkpoint_every=checkpoint_every,
                                 init_from=os.path.abspath(init_from) if init_from else None))
    seconds = {}
    t = kit.stage("1/5 curate the captions (Beam, DirectRunner)")
    curated = _done(os.path.join(output, "curate", "summary.json")) or \
        kit.curate(captions, os.path.join(output, "curate"))
    seconds["curate"] = time.monotonic() - t
    t = kit.stage("2/5 teacher dump: shapes teacher, full trajectories (Beam, DirectRunner)")
    if not os.path.isfile(os.path.join(output, "dump", "dataset.json")):
        kit.dump(os.path.join(output, "curate", "manifest.parquet"), os.path.join(output, "dump"),
                 seeds_per_prompt=seeds_per_prompt, samples_per_shard=256)
    dataset = read_dataset_info(os.path.join(output, "dump"))
    seconds["dump"] = time.monotonic() - t
    t = kit.stage(f"3/5 step-distil the student for {student_steps} steps")
    run_dir = os.path.join(output, "train")
    found = checkpoints(run_dir)
    if not (found and found[-1].endswith(f"step-{train_steps:07d}")):
        kit.train(os.path.join(output, "dump"), run_dir, student_steps=student_steps, max_steps=train_steps,
                       init_from_teacher=init_from_teacher, init_from=init_from,
                       checkpoint_every=min(checkpoint_every, train_steps),
                       keep_checkpoints=2)
    seconds["train"] = time.monotonic() - t
    t = kit.stage("4/5 export a diffusers pipeline folder")
    folder = os.path.join(output, "student")
    if not os.path.isfile(os.path.join(folder, "inference.json")):
        export(run_dir, folder)
    seconds["export"] = time.monotonic() - t
    t = kit.stage("5/5 evaluate teacher and student on held-out captions")
    metrics = _done(os.path.join(output, "eval", "metrics.json"))
    if metrics is None:
        analyser = load_analyser()
        cfg = EvalConfig(output=os.path.join(output, "eval"),
                         captions=_eval_captions(os.path.join(output, "eval_captions.txt"), eval_images),
                         student=folder, teacher=kit.TEACHER, num_images=eval_images,
                         teacher_steps=(kit.TEACHER_STEPS, student_steps), student_steps=(student_steps,),
                         guidance_scale=float(dataset.dump_recipe.sampler.guidance_scale),  # every row at the dump's
                         metrics=(), batch_size=48, grid_images=8, latency_repeats=3)
        metrics = evaluate(cfg, extra_metrics=(Adherence(analyser), AnalyserFrechet(analyser)))
    seconds["eval"] = time.monotonic() - t
    cost = _done(os.path.join(output, "eval", "cost.json"))
    if cost is None:
        from diffusers import UNet2DConditionModel

        from core.fs import atomic_write_json
        from students.training.runs import load_student_unet, read_run
        from teachers.load import SHAPES_ARCHS
        from teachers.shapes import model as shapes_model

        size = int(metrics["protocol"]["image_size"])
        # cost is the architecture's: the teacher UNet built from its config (evaluate() loaded the weights already)
        teacher_unet = UNet2DConditionModel(**shapes_model.unet_config(SHAPES_ARCHS[kit.TEACHER])).eval()
        cost = {"teacher": unet_cost(teacher_unet, size),
                "student": unet_cost(load_student_unet(read_run(run_dir).files, "ema"), size)}
        atomic_write_json(os.path.join(output, "eval", "cost.json"), cost)
    return write_report(output, curated, dataset, metrics, seconds,
                        describe_student(init_from_teacher, student_steps, init_from), cost)


_S_OUTPUT = "output"
_S_STAGES = "the stages"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    output: str = option(section=_S_OUTPUT,
                         help="folder for every stage's output and report.html; re-running into it continues the demo")
    train_steps: int = option(200, section=_S_STAGES,
                              help="student training steps (fine-tuning the bundled student; a teacher-cut student "
                              "converges in about 200 at this batch, the shapes preset from scratch wants thousands)")
    init_from: str = option(BUNDLED_STUDENT, section=_S_STAGES,
                            help="start from this student: 'shapes_small' (the bundled 4-step student), a run or "
                            "checkpoint folder, or '' (then --init_from_teacher, or from scratch)")
    init_from_teacher: str = option("", section=_S_STAGES,
                                    help="with --init_from '': start the student from the teacher's weights, cut "
                                    f"this way (students.models.teacher_init, e.g. {INIT_FROM_TEACHER}; '' = the shapes "
                                    "preset from scratch)")
    student_steps: int = option(STUDENT_STEPS, section=_S_STAGES,
                                help="sampling steps the student is distilled for (the bundled student's: 4)")
    seeds_per_prompt: int = option(2, section=_S_STAGES, help="teacher generations per caption")
    eval_images: int = option(96, section=_S_STAGES, help="held-out captions evaluated (teacher and student)")
    captions: str | None = option(None, section=_S_STAGES,
                                  help="captions file to curate (default: the bundled shapes-world captions)")
    checkpoint_every: int = option(50, section=_S_OUTPUT,
                                   help="training checkpoints: a killed demo re-run with the same flags resumes "
                                   "from the newest")

    def __post_init__(self):
        for name in ("train_steps", "seeds_per_prompt", "eval_images", "checkpoint_every", "student_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)} must be >= 1")
        if os.path.isfile(self.output):
            raise UserError(f"--output {self.output!r} is an existing file: give a folder")
        if self.captions is not None and not os.path.isfile(self.captions):
            raise UserError(f"--captions {self.captions!r}: no such file")
        from students.models.teacher_init import CUTS

        if self.init_from_teacher and self.init_from_teacher not in CUTS:
            raise UserError(f"--init_from_teacher {self.init_from_teacher!r} is not a cut ({', '.join(CUTS)}) or ''")
        if self.init_from and self.init_from_teacher:
            raise UserError("--init_from and --init_from_teacher both give the student's start: pass --init_from '' "
                            "with --init_from_teacher")
        if self.init_from and self.init_from != BUNDLED_STUDENT and not os.path.isdir(self.init_from):
            raise UserError(f"--init_from {self.init_from!r}: no such run or checkpoint folder")


def _main(argv: list[str]) -> int:
    cfg, _ = parse(DemoConfig, argv, prog="distill demo", description=__doc__.split("\n\n")[0])
    start = time.monotonic()
    report = run(cfg.output, train_steps=cfg.train_steps, seeds_per_prompt=cfg.seeds_per_prompt,
                 eval_images=cfg.eval_images, init_from_teacher=cfg.init_from_teacher or None, captions=cfg.captions,
                 checkpoint_every=cfg.checkpoint_every, student_steps=cfg.student_steps, init_from=cfg.init_from or None)
    print(f"\ndemo finished in {(time.monotonic() - start) / 60:.1f} min. Report: {os.path.abspath(report)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("distill demo", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
