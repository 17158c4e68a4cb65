"""Bad input to ``distill train|export|eval|profile``: exit code 2 and exactly one stderr line naming
the problem, no traceback, nothing written. Each case is planted by hand; ``CASES`` is the table in
docs/bad_input.md (the students commands)."""

import json
import os
import subprocess
import sys

import pytest

from students.evaluation import evaluate
from students.cost import profile
from students.export import folder as export
from students.export import ondevice as generate
from students.search import evolve
from students.training import cli as train

DDIM = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
        "timestep_spacing": "leading"}


def dataset(folder, **changes) -> str:
    """A dump folder with a dataset.json (and no shard unless listed): enough for the checks before training."""
    os.makedirs(folder, exist_ok=True)
    info = {"schema_version": 1, "scheduler_class": "DDIMScheduler", "scheduler_config": DDIM, "prediction_type": "epsilon",
            "recipe": {"teacher": "tiny", "num_inference_steps": 4}, "recipe_hash": "0" * 16, "recorded_steps": [0, 1, 2, 3], "shared": {},
            "shards": [{"shard": "000000.tar", "count": 4}]}
    info.update(changes)
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(info, f)
    return str(folder)


def eight_steps(folder) -> str:
    """A dump of 8 recorded teacher steps (``dataset``'s is 4)."""
    return dataset(folder, recipe={"teacher": "tiny", "num_inference_steps": 8}, recorded_steps=list(range(8)))


def with_index(folder, text: str | None = None, **changes) -> str:
    """``dataset`` with the index 000000.json of its one listed shard: valid, with ``changes``, or ``text`` as is."""
    data = dataset(folder)
    index = {"shard": "000000.tar", "count": 0, "keys": [], "bytes": 0, "sha256": "0" * 64, "schema_version": 2,
             "recipe_hash": "0" * 16, **changes}
    with open(os.path.join(folder, "000000.json"), "w", encoding="utf-8") as f:
        f.write(text if text is not None else json.dumps(index))
    return data


def with_negatives(folder, **arrays) -> str:
    """A ``dataset`` whose unconditional embeddings (stored once) have these shapes: what sets the dump's
    text conditioning for the checks before training (no shard needed)."""
    import numpy as np

    names = {name: f"{name}.npy" for name in arrays}
    dataset(folder, shared=names)
    for name, shape in arrays.items():
        np.save(os.path.join(folder, names[name]), np.zeros(shape, np.float32))
    return str(folder)


def fake_checkpoint(folder, *, config=None, weights=True) -> str:
    """A checkpoint folder: config.json (a run's, unless given) and student/ + ema/ (with or without weights)."""
    os.makedirs(folder, exist_ok=True)
    data = dataset(os.path.join(folder, "..", "dump"))
    cfg = config if config is not None else {"train": {"data": data, "preset": "tiny"}, "recipe": {"name": "output_kd"}, "step": 1}
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    for sub in ("student", "ema"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        with open(os.path.join(folder, sub, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"_class_name": "EfficientUNet2DConditionModel"}, f)
        if weights:
            open(os.path.join(folder, sub, "diffusion_pytorch_model.safetensors"), "wb").close()
    return str(folder)


def _train(tmp, *extra, data=None):
    return ["--data", data or dataset(tmp / "d"), "--output", str(tmp / "run"), *extra]


def _evolve(tmp, *extra, output=None):
    (tmp / "v.txt").write_text("a red circle on a white background\n")
    return ["--data", dataset(tmp / "d"), "--output", output or str(tmp / "evo"), "--val_captions", str(tmp / "v.txt"),
            "--latency_target_ms", "5", *extra]


def planted_evolution(tmp, *extra, records: int = 1, finished: bool = False) -> list[str]:
    """An evolution folder as ``distill evolve`` leaves it (evolve.json of ``_evolve(tmp, *extra)``'s settings,
    ``records`` iterations in evolution.jsonl, student_config.json when ``finished``); -> that argv."""
    argv = _evolve(tmp, *extra)
    out = tmp / "evo"
    out.mkdir()
    (out / evolve.SETTINGS).write_text(json.dumps(evolve.evolve_settings(evolve.parse_args(argv))))
    record = {"metric_name": "adherence", "metric": 0.5, "predicted_ms": 4.0, "measured_ms": 4.1, "target_ms": 5.0}
    (out / evolve.EVOLUTION).write_text("".join(json.dumps(dict(record, iteration=i + 1)) + "\n" for i in range(records)))
    if finished:
        (out / "student_config.json").write_text("{}")
    return argv


def _latin1(tmp) -> str:
    (tmp / "captions.txt").write_bytes("a caf\xe9 at night\n".encode("latin-1"))
    return str(tmp / "captions.txt")


def _eval(tmp, *extra):
    (tmp / "c.txt").write_text("a red circle\n")
    return ["--teacher", "tiny", "--teacher_steps", "1", "--num_images", "1", "--captions", str(tmp / "c.txt"),
            "--output", str(tmp / "e"), *extra]


# (id, command, argv builder(tmp) -> argv, words the one line must contain)
CASES = [
    ("train preset typo", train, lambda t: _train(t, "--preset", "tinyy"), ["unknown student preset 'tinyy'"]),
    ("train recipe typo", train, lambda t: _train(t, "--recipe", "snapgen"), ["--recipe 'snapgen' is not one of bk_sdm|flow_kd|"]),
    ("train batch size 0", train, lambda t: _train(t, "--batch_size", "0"), ["--batch_size must be at least 1, got 0"]),
    ("train max steps -1", train, lambda t: _train(t, "--max_steps", "-1"), ["--max_steps must be at least 1, got -1"]),
    ("train batch size not a number", train, lambda t: _train(t, "--batch_size", "eight"), ["--batch_size", "invalid int value"]),
    ("train ema decay 1.5", train, lambda t: _train(t, "--ema_decay", "1.5"), ["--ema_decay must be in [0, 1)"]),
    ("train no --data", train, lambda t: ["--output", str(t / "run")], ["required", "--data"]),
    ("train unknown flag", train, lambda t: _train(t, "--bach_size", "4"), ["unrecognized arguments: --bach_size", "(did you mean --batch_size?)"]),
    ("train --data missing", train, lambda t: _train(t, data=str(t / "nowhere")), ["does not exist"]),
    ("train --data empty folder", train, lambda t: (os.makedirs(t / "empty"), _train(t, data=str(t / "empty")))[1],
     ["dataset.json missing", "not a finished dataset"]),
    ("train zero shards", train, lambda t: _train(t, data=dataset(t / "z", shards=[])), ["no complete shards"]),
    ("train schema_version 99", train, lambda t: _train(t, data=dataset(t / "v", schema_version=99)),
     ["dataset.json", "schema_version 99", "reads 1, 2"]),
    ("train dataset.json not JSON", train,
     lambda t: (os.makedirs(t / "j"), (t / "j" / "dataset.json").write_text("{oops"), _train(t, data=str(t / "j")))[2],
     ["dataset.json", "not valid JSON"]),
    ("train Euler schema-1 dump", train, lambda t: _train(t, data=dataset(t / "e", scheduler_class="EulerDiscreteScheduler")),
     ["EulerDiscreteScheduler", "cannot read"]),
    ("train --output is a file", train,
     lambda t: ((t / "file").write_text("x"), ["--data", dataset(t / "d"), "--output", str(t / "file")])[1],
     ["--output", "is an existing file"]),
    ("train unknown online teacher", train, lambda t: _train(t, "--online_teacher", "no-such-teacher"),
     ["--online_teacher", "unknown teacher 'no-such-teacher'"]),
    ("train unknown decoder", train, lambda t: _train(t, "--decoder", "huge"), ["unknown decoder preset 'huge'"]),
    ("train v-prediction dump, epsilon recipe", train, lambda t: _train(t, data=dataset(t / "vp", prediction_type="v_prediction")),
     ["trains a epsilon student on a v_prediction teacher"]),
    ("train step distillation on a partial trajectory", train,
     lambda t: _train(t, "--recipe", "snapfusion_step", data=dataset(t / "p", recorded_steps=[0, 2])),
     ["needs every teacher step recorded"]),
    ("train progressive from 16 on an 8-step dump", train,
     lambda t: _train(t, "--recipe", "progressive", "--progressive_from", "16", "--student_steps", "4", data=eight_steps(t / "d8")),
     ["--progressive_from 16 is not the 8 teacher steps", "pass --progressive_from 8"]),
    ("train progressive from 6 to 3 on an 8-step dump", train,
     lambda t: _train(t, "--recipe", "progressive", "--progressive_from", "6", "--student_steps", "3", data=eight_steps(t / "d8")),
     ["--progressive_from 6 is not the 8 teacher steps"]),
    ("train 3 student steps on an 8-step dump", train,
     lambda t: _train(t, "--recipe", "snapfusion_step", "--student_steps", "3", data=eight_steps(t / "d8")),
     ["--student_steps 3 does not divide the 8 teacher steps", "it would train 4 jumps"]),
    ("train 16 student steps on an 8-step dump", train,
     lambda t: _train(t, "--recipe", "snapfusion_step", "--student_steps", "16", data=eight_steps(t / "d8")),
     ["--student_steps 16 is more than the 8 teacher steps"]),
    ("train the recipe's 8 student steps on a 4-step dump", train, lambda t: _train(t, "--recipe", "snapfusion_step"),
     ["--student_steps 8 (the default of recipe 'snapfusion_step') is more than the 4 teacher steps"]),
    ("train a shard without its index", train, lambda t: _train(t), ["shard ", "000000.tar", "000000.json is missing"]),
    ("train a shard index not JSON", train, lambda t: _train(t, data=with_index(t / "d", "{oops")),
     ["shard ", "000000.json is unreadable"]),
    ("train a shard index of schema_version 99", train, lambda t: _train(t, data=with_index(t / "d", schema_version=99)),
     ["shard ", "000000.json has schema_version 99", "reads 1, 2"]),
    ("train preset of another text width", train,  # the shapes teacher's text width: 64; tiny's: 32
     lambda t: _train(t, "--preset", "tiny", data=with_negatives(t / "w", negative_prompt_embeds=(77, 64))),
     ["--preset tiny has cross_attention_dim 32", "prompt embeddings of width 64", "presets that fit: shapes"]),
    ("train SD preset on an SDXL-shaped dump", train,
     lambda t: _train(t, "--preset", "shapes", data=with_negatives(t / "x", negative_prompt_embeds=(77, 64),
                                                                   negative_pooled_prompt_embeds=(32,))),
     ["--preset shapes is SD-shaped", "is SDXL-shaped (with pooled text embeddings)", "presets that fit: tiny_xl"]),
    ("train weight decay nan", train, lambda t: _train(t, "--weight_decay", "nan"),
     ["--weight_decay must be a finite number >= 0, got nan"]),
    ("train grad clip inf", train, lambda t: _train(t, "--grad_clip", "inf"), ["--grad_clip must be a finite number >= 0, got inf"]),
    ("export folder that is not a run", export,
     lambda t: [fake_checkpoint(t / "ck", config={"_class_name": "StableDiffusionPipeline"}), str(t / "out")],
     ["not a training checkpoint's config"]),
    ("export checkpoint without weight files", export,
     lambda t: [fake_checkpoint(t / "ck", weights=False), str(t / "out")], ["no config.json and weights file", "incomplete"]),
    ("export nothing there", export, lambda t: [str(t / "nothing"), str(t / "out")], ["neither a checkpoint folder"]),
    ("export --overwrite onto a shard dataset", export,
     lambda t: [fake_checkpoint(t / "ck"), dataset(t / "dump2"), "--overwrite"], ["is not a previous export"]),
    ("export output is a file", export,
     lambda t: ((t / "f").write_text("x"), [fake_checkpoint(t / "ck"), str(t / "f")])[1], ["is an existing file"]),
    ("export bad --weights", export, lambda t: [str(t / "a"), str(t / "b"), "--weights", "best"], ["--weights 'best' is not one of ema|raw"]),
    ("export three positionals", export, lambda t: ["a", "b", "c"], ["expected CHECKPOINT OUTPUT"]),
    ("eval no --captions", evaluate, lambda t: ["--output", str(t / "e")], ["required", "--captions"]),
    ("eval steps not numbers", evaluate, lambda t: ["--output", str(t / "e"), "--captions", "c.txt", "--teacher_steps", "8,x"],
     ["--teacher_steps", "invalid"]),
    ("eval guidance scale nan", evaluate, lambda t: _eval(t, "--guidance_scale", "nan"),
     ["--guidance_scale nan must be a finite number >= 0"]),
    ("eval output is a file", evaluate, lambda t: ((t / "f").write_text("x"), _eval(t, "--output", str(t / "f")))[1],
     ["--output", "is an existing file"]),
    ("eval output is a dump", evaluate, lambda t: _eval(t, "--output", dataset(t / "dump")),
     ["--output", "holds a shard dataset (dataset.json)"]),
    ("eval non-UTF-8 captions", evaluate, lambda t: _eval(t, "--captions", _latin1(t)),
     ["--captions", "captions.txt' is not UTF-8 text (byte 5: invalid continuation byte)"]),
    ("evolve output is a file", evolve, lambda t: ((t / "f").write_text("x"), _evolve(t, output=str(t / "f")))[1],
     ["--output", "is an existing file"]),
    ("evolve output is a training run", evolve,
     lambda t: (os.makedirs(t / "run" / "checkpoints"), _evolve(t, output=str(t / "run")))[1],
     ["--output", "holds a training run (checkpoints/)"]),
    ("evolve over an evolution of other settings", evolve,
     lambda t: (planted_evolution(t, "--iterations", "3"), _evolve(t, "--iterations", "5", "--max_actions", "2"))[1],
     ["holds an evolution made with other settings (--iterations 3 -> 5, --max_actions 1 -> 2)", "new --output"]),
    ("generate seed -1", generate, lambda t: ["--onnx", str(t / "x"), "a cat", "--seed", "-1", "--output", str(t / "i.png")],
     ["--seed must be an integer in [0, 2**63), got -1"]),
    ("generate output is a folder", generate, lambda t: (os.makedirs(t / "o"), ["--onnx", str(t / "x"), "a cat", "--output", str(t / "o")])[1],
     ["--output", "is a folder: give the path of a file to write"]),
    ("generate into a missing folder", generate, lambda t: ["--onnx", str(t / "x"), "a cat", "--output", str(t / "no" / "i.png")],
     ["--output", "its folder", "does not exist"]),
    ("profile --json is a folder", profile, lambda t: (os.makedirs(t / "o"), ["--presets", "tiny", "--json", str(t / "o")])[1],
     ["--json", "is a folder"]),
    ("profile --json into a missing folder", profile, lambda t: ["--presets", "tiny", "--json", str(t / "no" / "c.json")],
     ["--json", "does not exist"]),
    ("profile --lookup is a folder", profile, lambda t: (os.makedirs(t / "o"), ["--presets", "tiny", "--lookup", str(t / "o")])[1],
     ["--lookup", "is a folder"]),
    ("profile unknown preset", profile, lambda t: ["--presets", "bogus"], ["unknown preset(s) ['bogus']"]),
    ("profile repeats 0", profile, lambda t: ["--repeats", "0"], ["--repeats must be >= 1"]),
    ("profile bad resolution", profile, lambda t: ["--resolution", "500"], ["multiple of 64"]),
]


@pytest.mark.parametrize("name,module,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(name, module, argv, words, tmp_path, capsys):
    args = argv(tmp_path)
    before = sorted(p for p in os.listdir(tmp_path))
    assert module.main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    verb = {"cli": "train", "folder": "export", "evaluate": "eval", "ondevice": "generate"}.get(module.__name__.split(".")[-1], module.__name__.split(".")[-1])
    assert lines[0].startswith(f"distill {verb}: error: ")
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written: no run folder, no export, no temporaries
    if name == "export --overwrite onto a shard dataset":
        assert (tmp_path / "dump2" / "dataset.json").exists()


def test_bad_input_from_the_command_line_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "students.training", "--data", dataset(tmp_path / "d"), "--output",
                           str(tmp_path / "run"), "--max_steps", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["distill train: error: --max_steps must be at least 1, got -1"]
    assert not (tmp_path / "run").exists()


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    assert train.main(_train(tmp_path, "--batch_size", "0", "--debug")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "distill train: error: --batch_size must be at least 1, got 0"


def test_a_finished_evolution_says_so_and_runs_nothing(tmp_path, capsys):
    """It printed the old run's result as if it were new."""
    argv = planted_evolution(tmp_path, records=4, finished=True)  # --iterations 4, the default
    before = sorted(os.listdir(tmp_path / "evo"))
    assert evolve.main(argv) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f"distill evolve: {tmp_path / 'evo'} is finished (4 of --iterations 4); nothing "
                                        "was run: the result below is that evolution's (pass a new --output to evolve again)"]
    assert out.startswith("evolve: 4 iterations (finished earlier); final adherence 0.5000")
    assert sorted(os.listdir(tmp_path / "evo")) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine with a GPU runs --device cuda")
@pytest.mark.parametrize("module,argv", [
    (train, lambda t: _train(t, "--device", "cuda")),
    (evaluate, lambda t: _eval(t, "--device", "cuda")),
    (evolve, lambda t: _evolve(t, "--device", "cuda")),
    (profile, lambda t: ["--presets", "tiny", "--device", "cuda:0"]),
], ids=["train", "eval", "evolve", "profile"])
def test_device_cuda_without_a_gpu_is_one_line_before_the_output_exists(module, argv, tmp_path, capsys):
    args = argv(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert module.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU is visible on this machine" in lines[0] and "pass --device cpu" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == before  # no run/eval/evolution folder
