"""Bad input to the jobs (curate, dump, filter) and the launchers (``beam run``, ``distill``).

Each kind either fails before any work with exit code 2 and exactly one stderr line naming the
problem (no traceback, nothing written into the output folder), or is a counted rejection with
the reason and the rest of the data intact. The table of kinds is ``docs/bad_input.md``.
The commands run in-process through their ``main(argv)``; one case each runs ``beam`` and
``distill`` as subprocesses.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import dump_flags

from diffusion_distill import beam_cli, cli
from filters import reasons
from pipelines import curate, dump, filter as filter_job
from shards.record import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
TINY = dump_flags(num_inference_steps=1, batch_size=4, feature_layers="", num_feature_steps=None, cpu_threads=1)
NOISE = ("WARNING:root:apitools",)  # Beam's import-time warning where apitools is not installed


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(NOISE)]


def assert_one_line(capsys, main, argv, prog, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{prog}: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------
# files the cases use
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    f = {}
    (tmp_path / "p.txt").write_text("a red boat at sea\n")
    f["prompts"] = str(tmp_path / "p.txt")
    (tmp_path / "a_file").write_text("not a folder")
    f["file"] = str(tmp_path / "a_file")
    (tmp_path / "folder").mkdir()
    f["folder"] = str(tmp_path / "folder")
    (tmp_path / "p.csv").write_text("caption\nx\n")
    f["csv"] = str(tmp_path / "p.csv")
    pq.write_table(pa.table({"key": ["a", "b"], "caption": ["a cat", "a dog"]}), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    f["truncated"] = str(tmp_path / "truncated.parquet")
    pq.write_table(pa.table({"key": ["a"], "text": ["x"]}), tmp_path / "nocaption.parquet")
    f["nocaption"] = str(tmp_path / "nocaption.parquet")
    (tmp_path / "bad.json").write_text("{not json")
    f["badjson"] = str(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    f["listjson"] = str(tmp_path / "list.json")
    f["out"] = str(tmp_path / "out")
    # filter parents: no dataset.json; a corrupt one; an unscored one; a scored one without aesthetic weights
    scored = {"schema_version": SCHEMA_VERSION, "recipe_hash": "h", "shards": [], "recipe": {
        "samples_per_shard": 4, "score_images": {"preset": "tiny", "clip_model": "dd-tiny-clip", "clip_weights": "random",
                                                 "aesthetic_weights": None, "embed_dim": 32}}}
    (tmp_path / "badindex").mkdir()  # a scored dump listing one shard whose index is not JSON
    (tmp_path / "badindex" / "dataset.json").write_text(json.dumps({**scored, "shards": [
        {"shard": "000000.tar", "count": 1, "bytes": 1024, "sha256": "0" * 64}]}))
    (tmp_path / "badindex" / "000000.json").write_text("{oops")
    f["badindex"] = str(tmp_path / "badindex")
    for name, content in (("broken", "{oops"),
                          ("unscored", json.dumps({"schema_version": SCHEMA_VERSION, "recipe": {}, "recipe_hash": "h",
                                                   "shards": []})),
                          ("future", json.dumps({**scored, "schema_version": 99})),
                          ("scored", json.dumps(scored))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset.json").write_text(content)
        f[name] = str(tmp_path / name)
    return f


def out_untouched(files) -> bool:
    return not os.path.exists(files["out"]) or os.path.isfile(files["out"])


# ---------------------------------------------------------------------------------------------
# one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------

DUMP_CASES = {
    "prompts_missing": (lambda f: ["--prompts", f["prompts"] + ".nope", "--output", f["out"]], "does not exist"),
    "prompts_is_a_folder": (lambda f: ["--prompts", f["folder"], "--output", f["out"]], "is a folder"),
    "prompts_unknown_kind": (lambda f: ["--prompts", f["csv"], "--output", f["out"]], "unknown input kind '.csv'"),
    "prompts_truncated_parquet": (lambda f: ["--prompts", f["truncated"], "--output", f["out"]],
                                  "truncated.parquet' is not a readable Parquet file"),
    "manifest_without_caption": (lambda f: ["--prompts", f["nocaption"], "--output", f["out"]],
                                 "lacks column(s) ['caption']"),
    "prompts_flag_missing": (lambda f: ["--output", f["out"]], "required: --prompts"),
    "output_is_a_file": (lambda f: ["--prompts", f["prompts"], "--output", f["file"]], "is an existing file"),
    "zero_steps": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--num_inference_steps", "0"],
                   "--num_inference_steps 0 must be >= 1"),
    "batch_size_not_a_number": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--batch_size", "x"],
                                "invalid int value: 'x'"),
    "guidance_range_one_value": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--guidance_range", "3"],
                                 "must be LO,HI"),
    "guidance_range_reversed": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--guidance_range", "9,2"],
                                "guidance_range"),
    "record_steps_not_numbers": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--record_steps", "a,b"],
                                 "--record_steps 'a,b'"),
    "unknown_teacher": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--teacher", "sd99"],
                        "unknown teacher 'sd99'"),
    "unknown_dtype": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--dtype", "float8"],
                      "--dtype 'float8' is not one of"),
    "impossible_resolution": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--resolution", "100"],
                              "--resolution 100 is not possible"),
    "unknown_progress_mode": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--progress", "maybe"],
                              "--progress 'maybe' is not one of auto|on|off"),
    "flag_typo": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--num_inferance_steps", "4"],
                  "unknown flag --num_inferance_steps (did you mean --num_inference_steps?)"),
    "typo_of_a_required_flag": (lambda f: ["--promts", f["prompts"], "--output", f["out"]],
                                "unknown flag --promts (did you mean --prompts?)"),  # not "required: --prompts"
    "beam_flag_typo": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--direct_num_worker=1"],
                       "unknown flag --direct_num_worker (did you mean --direct_num_workers?)"),
    "stray_argument": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--save_main_session", "yes"],
                       "unexpected argument 'yes'"),  # a Beam flag that takes no value
    "guidance_range_infinite": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--guidance_range", "2,inf"],
                                "--guidance_range 2.0,inf must be two finite numbers LO,HI"),  # OverflowError on a worker
    "guidance_scale_infinite": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--guidance_scale", "inf"],
                                "--guidance_scale inf must be a finite number"),  # every sample rejected non_finite
    "guidance_scale_nan": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--guidance_scale", "nan"],
                           "--guidance_scale nan must be a finite number"),
    "steps_beyond_the_schedule": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--num_inference_steps",
                                             "1000000000000"],
                                  "--num_inference_steps 1000000000000 is more than the 1000 training timesteps"),  # MemoryError
    "unknown_runner": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--runner=Bogus"],
                       "--runner 'Bogus': Unexpected pipeline runner: Bogus. Valid values are"),
    "device_not_a_device": (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--device", "gpu"],
                            "--device 'gpu' is not cpu, cuda, cuda:N or mps"),
}
if not __import__("torch").cuda.is_available():  # a worker's RuntimeError "Found no NVIDIA driver", the folder made first
    DUMP_CASES["device_cuda_without_a_gpu"] = (lambda f: ["--prompts", f["prompts"], "--output", f["out"], "--device", "cuda"],
                                               "--device cuda: no CUDA GPU is visible on this machine")


@pytest.mark.parametrize("case", DUMP_CASES)
def test_dump_bad_input_is_one_line(capsys, files, case):
    argv, needle = DUMP_CASES[case]
    assert_one_line(capsys, dump.main, [*TINY, *argv(files)], "distill dump", needle)  # a later flag wins
    assert out_untouched(files)


def test_dump_offline_hub_teacher_is_refused_on_the_launcher_and_leaves_no_state(capsys, files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(Path(files["out"]).parent / "hf"))  # an empty cache
    assert_one_line(capsys, dump.main, [*TINY, "--prompts", files["prompts"], "--output", files["out"],
                                        "--teacher", "org/name"], "distill dump", "'org/name' is not in the local hub cache")
    assert not os.path.exists(files["out"])  # so the same command with --teacher tiny starts clean


FILTER_CASES = {
    "input_missing": (lambda f: ["--input", f["out"] + "_nope", "--output", f["out"]], "does not exist"),
    "input_not_a_dump": (lambda f: ["--input", f["folder"], "--output", f["out"]], "has no dataset.json"),
    "dataset_json_corrupt": (lambda f: ["--input", f["broken"], "--output", f["out"]], "dataset.json is not JSON"),
    "input_unscored": (lambda f: ["--input", f["unscored"], "--output", f["out"]], "holds no image scores"),
    "schema_version_unknown": (lambda f: ["--input", f["future"], "--output", f["out"]], "has schema_version 99"),
    "output_is_a_file": (lambda f: ["--input", f["scored"], "--output", f["file"]], "is an existing file"),
    "output_is_the_input": (lambda f: ["--input", f["scored"], "--output", f["scored"]], "is the --input folder"),
    "eps_not_a_number": (lambda f: ["--input", f["scored"], "--output", f["out"], "--semdedup_eps", "abc"],
                         "invalid float value: 'abc'"),
    "top_fraction_above_one": (lambda f: ["--input", f["scored"], "--output", f["out"], "--clip_score_top_fraction", "2"],
                               "clip_score_top_fraction"),
    "aesthetic_without_scores": (lambda f: ["--input", f["scored"], "--output", f["out"], "--aesthetic_threshold", "5"],
                                 "has no aesthetic scores"),
    "negative_shard_size": (lambda f: ["--input", f["scored"], "--output", f["out"], "--samples_per_shard", "-1"],
                            "must be >= 0"),
    "shard_index_not_json": (lambda f: ["--input", f["badindex"], "--output", f["out"]],
                             "the index 000000.json is unreadable: "),  # a worker's traceback after an ERROR log
    "flag_typo": (lambda f: ["--input", f["scored"], "--output", f["out"], "--semdedup_epz", "0.1"],
                  "unknown flag --semdedup_epz (did you mean --semdedup_eps?)"),
}


@pytest.mark.parametrize("case", FILTER_CASES)
def test_filter_bad_input_is_one_line(capsys, files, case):
    argv, needle = FILTER_CASES[case]
    assert_one_line(capsys, filter_job.main, argv(files), "distill filter", needle)
    assert out_untouched(files)


CURATE_CASES = {
    "input_missing": (lambda f: ["--input", f["prompts"] + ".nope", "--output", f["out"]], "matches no file"),
    "input_flag_missing": (lambda f: ["--output", f["out"]], "required: --input"),
    "output_is_a_file": (lambda f: ["--input", f["prompts"], "--output", f["file"]], "is an existing file"),
    "truncated_parquet": (lambda f: ["--input", f["truncated"], "--output", f["out"]],
                          "truncated.parquet' is not a readable Parquet file"),
    "parquet_without_text": (lambda f: ["--input", f["nocaption"], "--output", f["out"]], "has no 'URL' or 'url' column"),
    "coco_not_json": (lambda f: ["--input", f["badjson"], "--input_format", "coco", "--output", f["out"]], "is not JSON"),
    "config_not_json": (lambda f: ["--input", f["prompts"], "--output", f["out"], "--config", f["badjson"]],
                        "--config"),
    "config_not_an_object": (lambda f: ["--input", f["prompts"], "--output", f["out"], "--config", f["listjson"]],
                             "must hold a JSON object"),
    "punsafe_above_one": (lambda f: ["--input", f["prompts"], "--output", f["out"], "--max_punsafe", "2"],
                          "max_punsafe is a probability in [0, 1]"),
    "unknown_nsfw_policy": (lambda f: ["--input", f["prompts"], "--output", f["out"], "--nsfw", "maybe"],
                            "--nsfw 'maybe' is not one of drop-nsfw|drop-unsure|keep"),
    "unknown_preset": (lambda f: ["--input", f["prompts"], "--output", f["out"], "--preset", "nope"],
                       "--preset 'nope' is not one of default|laion-aesthetics|"),
    "unknown_input_format": (lambda f: ["--input", f["csv"], "--input_format", "csv", "--output", f["out"]],
                             "--input_format 'csv' is not one of laion|coco|txt|jsonl|wds"),
    "flag_typo": (lambda f: ["--input", f["prompts"], "--output", f["out"], "--max_pusnafe", "0.5"],
                  "unknown flag --max_pusnafe (did you mean --max_punsafe?)"),
    "unknown_runner": (lambda f: ["--input", f["prompts"], "--output", f["out"], "--runner", "Bogus"], "--runner 'Bogus'"),
}


@pytest.mark.parametrize("case", CURATE_CASES)
def test_curate_bad_input_is_one_line(capsys, files, case):
    argv, needle = CURATE_CASES[case]
    assert_one_line(capsys, curate.main, argv(files), "distill curate", needle)
    assert out_untouched(files)


BEAM_CASES = {
    "not_a_python_file": (["run", "pipelines/teacher_dump.txt"], "is not a Python pipeline file"),
    "no_such_pipeline": (["run", "pipelines/nope.py"], "no module 'pipelines.nope'"),
    "no_run_subcommand": (["go", "pipelines/teacher_dump.py"], "usage: beam run"),
    "job_flag_error": (["run", "pipelines/filter_shards.py", "--input"], "--input"),
    "unknown_runner": (["run", "pipelines/teacher_dump.py", "--prompts", "p.txt", "--output", "/nonexistent/o", "--runner=Bogus"],
                       "--runner 'Bogus': Unexpected pipeline runner"),
}


@pytest.mark.parametrize("case", BEAM_CASES)
def test_beam_run_launcher_errors_are_one_line(capsys, monkeypatch, case):
    monkeypatch.chdir(ROOT)
    argv, needle = BEAM_CASES[case]
    assert_one_line(capsys, beam_cli.main, argv, "beam run", needle)


TYPO = ("--num_inferance_steps", "4")
TYPO_LINE = "unknown flag --num_inferance_steps (did you mean --num_inference_steps?)"


def test_a_job_flag_typo_is_refused_through_distill_and_beam_run(capsys, files, monkeypatch):
    """Beam would log "Discarding unparseable args" and run the job with 50 steps."""
    job = [*TINY, "--prompts", files["prompts"], "--output", files["out"]]
    assert_one_line(capsys, cli.main, ["dump", *job, *TYPO], "distill dump", TYPO_LINE)
    assert not os.path.exists(files["out"])
    monkeypatch.chdir(ROOT)
    assert_one_line(capsys, beam_cli.main, ["run", "pipelines/teacher_dump.py", *job, *TYPO], "beam run", TYPO_LINE)
    assert not os.path.exists(files["out"])


def test_a_job_flag_typo_is_refused_through_python_m(files):
    proc = subprocess.run([sys.executable, "-m", "pipelines.dump", *TINY, "--prompts", files["prompts"],
                           "--output", files["out"], *TYPO], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [f"distill dump: error: {TYPO_LINE}: neither a flag "
                                                                 "of this job nor a Beam pipeline option"], proc.stderr
    assert not os.path.exists(files["out"])


BEAM_FLAGS = ["--runner=DirectRunner", "--direct_num_workers=1", "--direct_running_mode", "in_memory",
              "--temp_location=/tmp/x", "--project", "p", "--region=r", "--setup_file=./setup.py",
              "--experiments=no_use_multiple_sdk_containers", "--sdk_container_image=img",
              "--worker_machine_type=g2-standard-8", "--dataflow_service_options=worker_accelerator=type:nvidia-l4",
              "--number_of_worker_harness_threads=1", "--save_main_session", "--requirements_file=r.txt"]


def test_beam_options_pass_through_to_beam_by_name(files):
    from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions

    from pipelines import common

    from pipelines.dump.job import prepare

    cfg, _, _, beam_args = prepare([*TINY, "--prompts", files["prompts"], "--output", files["out"], *BEAM_FLAGS])
    assert beam_args == BEAM_FLAGS and cfg.num_inference_steps == 1
    options = common.pipeline_options(beam_args)
    assert options.view_as(DirectOptions).direct_num_workers == 1
    assert options.view_as(DirectOptions).direct_running_mode == "in_memory"
    assert options.view_as(GoogleCloudOptions).project == "p"
    assert not os.path.exists(files["out"])  # prepare writes nothing


def test_a_prefix_of_a_flag_never_selects_it(capsys, files):
    """argparse's allow_abbrev took ``--num_inference 4`` for ``--num_inference_steps`` (and ``--max_step``
    for ``--max_steps``): a prefix is a typo like any other, refused in one line naming the flag."""
    from shards import inspect as inspect_cli
    from students.training import cli as train_cli

    assert_one_line(capsys, dump.main, [*TINY, "--prompts", files["prompts"], "--output", files["out"],
                                        "--num_inference", "4"], "distill dump",
                    "unknown flag --num_inference (did you mean --num_inference_steps?)")
    assert_one_line(capsys, train_cli.main, ["--data", files["scored"], "--output", files["out"], "--max_step", "3"],
                    "distill train", "unrecognized arguments: --max_step 3 (did you mean --max_steps?)")
    assert_one_line(capsys, inspect_cli.main, [files["scored"], "--ver"], "distill inspect", "unrecognized arguments: --ver")
    assert not os.path.exists(files["out"])


def test_every_argparse_parser_refuses_abbreviations():
    """Every parser the project builds: ``core.options`` (all commands and jobs) and the scripts' own."""
    from core.options import build_parser

    from pipelines.dump.job import DumpConfig

    assert build_parser(DumpConfig, prog="x").allow_abbrev is False
    sources = [p for d in ("core", "pipelines", "shards", "students", "teachers", "filters", "diffusion_distill",
                           "benchmarks", "scripts", "infra") for p in ROOT.glob(f"{d}/**/*.py")]
    made = [(p, line) for p in sources for line in p.read_text().splitlines()
            if re.search(r"(ArgumentParser|_Parser)\(", line) and "class " not in line]
    assert len(made) >= 15 and all("allow_abbrev=False" in line for _, line in made), \
        [f"{p.relative_to(ROOT)}: {line.strip()}" for p, line in made if "allow_abbrev=False" not in line]


def test_distill_unknown_verb_is_one_line(capsys):
    assert_one_line(capsys, cli.main, ["dumpp"], "distill", "unknown verb 'dumpp'")


def test_distill_subprocess_one_line_no_traceback(files):
    proc = subprocess.run([sys.executable, "-m", "diffusion_distill.cli", "dump", "--prompts", files["folder"],
                           "--output", files["out"]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        f"distill dump: error: --prompts {files['folder']!r} is a folder: give a file"], proc.stderr


def test_a_dump_rerun_removes_stale_temporaries_in_the_whole_output(files):
    """The launcher cleaned only the output's top level: a kill's temporaries in _plan/ and rejects/ stayed."""
    argv = [*TINY, "--prompts", files["prompts"], "--output", files["out"]]
    first = dump.run(argv)
    out = Path(files["out"])
    planted = [out / "_plan" / "plan.parquet.tmp-0a1b", out / "rejects" / "input.jsonl.tmp-2c3d", out / "x.json.tmp-4e5f"]
    for path in planted:
        path.write_bytes(b"partial")
    again = dump.run(argv)
    assert not any(path.exists() for path in planted)
    assert again["shards"] == first["shards"] and (out / "_plan" / "plan.parquet").is_file()


def test_ctrl_c_in_a_dump_is_one_line_exit_130_and_leaves_what_a_kill_leaves(tmp_path):
    """It ended in ``RuntimeError: KeyboardInterrupt [while running 'GenerateShards']`` and Beam's
    logged traceback. Now: one line, exit 130, every shard written so far complete and intact, no
    dataset.json (the dump is not finished), the lock released, so the same command resumes."""
    import signal
    import time

    from shards.reader import list_indexes
    from shards.verify import verify_shard

    # 96 prompts: the dump must still be running when the first shard lands (a loaded machine writes
    # several shards between two polls); it is interrupted long before the end
    (tmp_path / "p.txt").write_text("".join(f"a photo of thing number {i}\n" for i in range(96)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_distill.cli", "dump", "--prompts", str(tmp_path / "p.txt"),
                             "--output", str(out), *TINY, "--num_inference_steps", "8", "--samples_per_shard", "1",
                             "--batch_size", "1"], stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)  # its own Ctrl-C, not the test runner's
    deadline = time.monotonic() + 120
    while not (out / "000000.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and error_lines(err) == [
        "distill dump: interrupted: what was written stays as a kill leaves it (complete shards and checkpoints; the "
        "same command resumes)"], err
    done = list_indexes(str(out))
    assert 1 <= len(done) < 96 and all(verify_shard(str(out), i) == [] for i in done)
    assert not (out / "dataset.json").exists() and not (out / ".distill.lock").exists()


# ---------------------------------------------------------------------------------------------
# counted rejections, the rest intact
# ---------------------------------------------------------------------------------------------

DUMP_ROWS = [
    b'{"key": "ok1", "caption": "a red boat at sea"}',
    b'{"key": "int", "caption": 7}',  # caption_not_text
    b'{"key": "ok1", "caption": "the same key again"}',  # duplicate_key
    b'{"key": "empty", "caption": "   "}',  # empty_caption
    b'{"key": "bad.key", "caption": "dots"}',  # bad_key
    b'{"key": "seed", "caption": "a seed", "seed": -3}',  # bad_seed
    b'{"key": "null", "caption": null}',  # null_caption
    b'{"key": "broken", "caption": ',  # bad_json
    b'[1, 2]',  # bad_json (not an object)
    '{"key": "latin", "caption": "caf\xe9"}'.encode("latin-1"),  # non_utf8_caption
    b'{"id": "old", "prompt": "a cat on a mat"}',  # deprecated names: read, with one warning line
]


def test_dump_counts_every_bad_row_with_its_reason_and_keeps_the_rest(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(DUMP_ROWS) + b"\n")
    out = tmp_path / "out"
    # a folder left by a run that failed before its first shard (another recipe, no results): taken over
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"recipe": {"teacher": "org/name"}, "recipe_hash": "0" * 16}))
    dataset = dump.run(["--prompts", str(tmp_path / "p.jsonl"), "--output", str(out), *TINY])
    err = capsys.readouterr().err
    assert dataset["rejects_by_reason"] == {
        reasons.CAPTION_NOT_TEXT: 1, reasons.DUPLICATE_KEY: 1, reasons.EMPTY_CAPTION: 1, reasons.BAD_KEY: 1,
        reasons.BAD_SEED: 1, reasons.NULL_CAPTION: 1, reasons.BAD_JSON: 2, reasons.NON_UTF8_CAPTION: 1}
    assert dataset["totals"]["prompts_in"] == 11 and dataset["totals"]["samples_written"] == 2
    assert [ln for ln in err.splitlines() if "deprecated" in ln] == [
        f"teacher dump: warning: {tmp_path / 'p.jsonl'}: column 'id' is deprecated, read for 1 row(s); name it 'key'",
        f"teacher dump: warning: {tmp_path / 'p.jsonl'}: column 'prompt' is deprecated, read for 1 row(s); "
        "name it 'caption'"]
    rejects = [json.loads(ln) for ln in (out / "rejects" / "input.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejects} <= set(reasons.ALL) and all("key" in r for r in rejects)
    assert {r["key"] for r in rejects if r["reason"] == reasons.DUPLICATE_KEY} == {"ok1"}


def test_curate_counts_nsfw_tags_and_orphan_annotations(tmp_path, capsys):
    pq.write_table(pa.table({
        "URL": [f"http://x/{i}.jpg" for i in range(4)],
        "TEXT": ["a photo of a lake at dawn", "an explicit photo here", "an ambiguous photo here", "a dog in a park"],
        "NSFW": ["UNLIKELY", "NSFW", "UNSURE", None],
    }), tmp_path / "laion.parquet")
    pq.write_table(pa.table({  # values outside NSFW/UNSURE/UNLIKELY were kept as safe
        "URL": ["http://x/5.jpg", "http://x/6.jpg", "http://x/7.jpg"],
        "TEXT": ["a tagged photo of a cat", "another tagged photo", "a third tagged photo"],
        "NSFW": ["MAYBE", "unlikely", "SAFE"],
    }), tmp_path / "laion2.parquet")
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 1, "coco_url": "http://coco/1.jpg", "width": 64, "height": 64}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "a boat on a river"},
                        {"id": 11, "image_id": 99, "caption": "an annotation of no image"}]}))
    summary = curate.run(["--input", str(tmp_path / "laion.parquet"), "--input", str(tmp_path / "coco.json"),
                          "--input", str(tmp_path / "laion2.parquet"), "--output", str(tmp_path / "out")])
    assert (summary["input"], summary["kept"], summary["filtered"], summary["rejected"]) == (9, 5, 1, 3)
    assert summary["by_reason"]["filtered"] == {reasons.NSFW_TAG: 1}
    assert summary["by_reason"]["rejected"] == {reasons.IMAGE_NOT_FOUND: 1, reasons.BAD_NSFW_TAG: 2}
    manifest = {r["caption"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert manifest["an explicit photo here"]["fate"] == "filtered" and manifest["an explicit photo here"]["nsfw"] == "NSFW"
    assert manifest["an ambiguous photo here"]["fate"] == "kept"  # UNSURE is kept by the default policy
    assert manifest["another tagged photo"]["fate"] == "kept"  # a tag in another case is the tag
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert sorted((r["fate"], r["reason"], r["detail"]) for r in rejects) == [
        ("rejected", reasons.BAD_NSFW_TAG, "NSFW 'MAYBE' is none of NSFW, UNSURE, UNLIKELY"),
        ("rejected", reasons.BAD_NSFW_TAG, "NSFW 'SAFE' is none of NSFW, UNSURE, UNLIKELY"),
        ("rejected", reasons.IMAGE_NOT_FOUND, "image_id 99 is not in 'images'")]
    # the curated manifest feeds the dump unchanged: it reads key, caption and fate
    from pipelines.dump.plan import read_input

    found = read_input(str(tmp_path / "out" / "manifest.parquet"))
    assert (len(found.rows), found.not_kept, found.deprecated) == (5, 1, {})


# ---------------------------------------------------------------------------------------------
# one home for reason codes
# ---------------------------------------------------------------------------------------------


def test_every_reason_code_is_defined_once_in_filters_reasons():
    codes = [v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str) and k not in
             ("KEPT", "FILTERED", "DUPLICATE", "REJECTED")]
    assert sorted(codes) == sorted(reasons.ALL) and len(set(codes)) == len(codes)
    assert all(reasons.fate_of(code) in reasons.FATES for code in reasons.ALL)
    # codes the shard record and its readers emit are listed too: every BadRecord raised in shards/, teachers/,
    # pipelines/, students/ (a literal or a shards.record constant), every skip the trainer's loader counts
    from shards import record

    emitted = set()
    for path in [p for package in ("shards", "teachers", "pipelines", "students") for p in ROOT.glob(f"{package}/**/*.py")]:
        text = path.read_text()
        emitted |= set(re.findall(r'BadRecord\("(\w+)"', text))
        emitted |= {getattr(record, name) for name in re.findall(r'BadRecord\((?:record\.)?([A-Z_]+)\b', text)}
        emitted |= set(re.findall(r'\.skip\("(\w+)"', text))
    assert {"checksum_mismatch", "missing_member", "non_finite_image", "corrupt_tar"} <= emitted
    assert emitted <= set(reasons.ALL), emitted - set(reasons.ALL)
    constants = {v for k, v in vars(record).items() if k.isupper() and isinstance(v, str) and k in (
        "NON_FINITE", "NON_FINITE_IMAGE", "BAD_KEY", "BAD_JSON", "SCHEMA", "CORRUPT_MEMBER", "CHECKSUM_MISMATCH",
        "MISSING_MEMBER")}
    assert constants <= set(reasons.ALL)
    # no reason code is spelled as a string literal in the jobs or the filters ("schema_version" is
    # also the name of a dataset.json field, which is not a reason)
    codes = set(reasons.ALL) - {reasons.SCHEMA_VERSION}
    for path in [*ROOT.glob("pipelines/**/*.py"), *ROOT.glob("filters/*.py")]:
        if path.name != "reasons.py":
            assert not set(re.findall(r'"(\w+)"', path.read_text())) & codes, path
