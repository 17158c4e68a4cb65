"""``beam run``: a job is imported by its module name whatever path names it, so worker processes import it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffusion_distill.beam_cli import load_pipeline_module, module_name_for

ROOT = Path(__file__).resolve().parents[1]
BEAM = os.path.join(os.path.dirname(sys.executable), "beam")


def test_every_spelling_of_a_path_names_the_same_module(tmp_path, monkeypatch):
    absolute = str(ROOT / "pipelines" / "teacher_dump.py")
    assert module_name_for(absolute) == ("pipelines.teacher_dump", str(ROOT))
    monkeypatch.chdir(ROOT)
    assert module_name_for("pipelines/teacher_dump.py") == ("pipelines.teacher_dump", str(ROOT))
    assert module_name_for("./pipelines/filter_shards.py") == ("pipelines.filter_shards", str(ROOT))
    assert module_name_for("pipelines/curate.py") == ("pipelines.curate", None)  # a package now: resolved by name
    assert load_pipeline_module("pipelines/curate.py").__name__ == "pipelines.curate"
    assert load_pipeline_module(absolute).__name__ == "pipelines.teacher_dump"


def _user_package(tmp_path) -> Path:
    """A user's own job outside the repo, in a package, with a DoFn the workers must import by name."""
    pkg = tmp_path / "userjobs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "square.py").write_text(textwrap.dedent('''
        import json, sys
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions

        class Square(beam.DoFn):
            def process(self, x):
                yield x * x

        def write(values, path):
            with open(path, "w") as f:
                json.dump(sorted(values), f)

        def run(argv=None):
            out, rest = argv[0], argv[1:]
            with beam.Pipeline(options=PipelineOptions(rest)) as p:
                (p | beam.Create(list(range(6))) | beam.Reshuffle() | beam.ParDo(Square())
                   | beam.combiners.ToList() | beam.Map(write, out))
    '''))
    return pkg / "square.py"


def test_an_absolute_path_outside_the_repo_runs_on_the_multi_process_runner(tmp_path):
    """The case that failed with ModuleNotFoundError: workers could not import a module loaded from a file."""
    job = _user_package(tmp_path)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = subprocess.run([BEAM, "run", str(job), str(tmp_path / "out.json"), "--runner=Direct",
                           "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text()) == [0, 1, 4, 9, 16, 25]


@pytest.mark.slow  # about 22 s on 2 cores: two worker processes each load torch and the teacher
def test_beam_run_absolute_path_multi_process_tiny_teacher(tmp_path):
    (tmp_path / "p.txt").write_text("a red boat\na cat on a mat\n")
    from conftest import dump_argv

    proc = subprocess.run([BEAM, "run", str(ROOT / "pipelines" / "teacher_dump.py"),
                           "--direct_running_mode=multi_processing", "--direct_num_workers=2",
                           *dump_argv(tmp_path / "p.txt", tmp_path / "o", num_inference_steps=2, samples_per_shard=1,
                                      batch_size=1, feature_layers="", cpu_threads=1)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dataset = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert dataset["totals"]["samples_written"] == 2 and len(dataset["shards"]) == 2


def test_launcher_errors_are_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([BEAM, "run", str(ROOT / "pipelines" / "teacher_dump.py"), "--prompts",
                           str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o"), "--teacher", "tiny"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    # exactly one line: Beam's "apitools not found" import warning is silenced where the CLIs start
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and lines == [f"beam run: error: --prompts '{tmp_path / 'missing.txt'}' does not exist"]
    assert not (tmp_path / "o").exists()
    proc = subprocess.run([sys.executable, "-m", "pipelines.filter", "--input", str(tmp_path / "nowhere"), "--output",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"distill filter: error: --input '{tmp_path / 'nowhere'}' does not exist"]
