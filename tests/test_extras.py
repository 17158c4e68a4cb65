"""The optional extras: a ``gs://`` or ``s3://`` path without its filesystem package, and the Dataflow
runner without Beam's Google Cloud packages, are one line naming the extra to install (exit 2, before
any work), not a traceback from wherever the path is first used.

The missing package is simulated (its ``sys.modules`` entry set to None, fsspec's cached class
dropped), so these tests mean the same with the extras installed and without them (CI has none).
"""

import importlib
import sys
import tomllib
from pathlib import Path

import pytest

from core import fs
from core.errors import UserError
from pipelines import common, curate, dump

ROOT = Path(__file__).resolve().parents[1]
FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")._registry  # fsspec's imported filesystem classes
NOISE = ("WARNING:root:apitools",)


def without(monkeypatch, *modules, protocols=()):
    """As if ``modules`` were not installed: importing one raises ImportError."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    for protocol in protocols:  # fsspec keeps a class once imported: forget it, so it imports again
        monkeypatch.delitem(FSSPEC_REGISTRY, protocol, raising=False)


def one_line(capsys, main, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(NOISE)]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("url, package, extra", [("gs://dd-bucket/x", "gcsfs", "gcp"), ("gcs://dd-bucket/x", "gcsfs", "gcp"),
                                                 ("s3://dd-bucket/x", "s3fs", "aws")])
def test_a_url_without_its_filesystem_package_names_the_extra(monkeypatch, url, package, extra):
    without(monkeypatch, package, protocols=("gs", "gcs", "s3", "s3a"))
    with pytest.raises(UserError) as err:
        fs.url_to_fs(url)
    assert str(err.value) == (f"{url!r}: {url.split(':')[0]}:// paths need {package}, which is not installed "
                              f"here: pip install 'diffusion-distill[{extra}]'")
    with pytest.raises(UserError, match=f"diffusion-distill\\[{extra}\\]"):
        fs.exists(url)  # every helper goes through url_to_fs


def test_local_and_memory_paths_need_no_extra(monkeypatch, tmp_path):
    without(monkeypatch, "gcsfs", "s3fs", protocols=("gs", "gcs", "s3", "s3a"))
    assert fs.is_local(fs.url_to_fs(str(tmp_path))[0]) and fs.url_to_fs("memory://x")[1] == "/x"
    assert fs.check_beam_filesystem(str(tmp_path)) == str(tmp_path)


def test_the_dump_refuses_a_gs_output_without_gcsfs_in_one_line(capsys, monkeypatch, tmp_path):
    without(monkeypatch, "gcsfs", protocols=("gs", "gcs"))
    (tmp_path / "p.txt").write_text("a red boat\n")
    line = one_line(capsys, dump.main, ["--prompts", str(tmp_path / "p.txt"), "--output", "gs://dd-bucket/out",
                                        "--teacher", "tiny"])
    assert line == ("distill dump: error: 'gs://dd-bucket/out': gs:// paths need gcsfs, which is not installed here: "
                    "pip install 'diffusion-distill[gcp]'")


def test_the_curate_job_checks_beams_own_filesystem_for_its_urls(capsys, monkeypatch, tmp_path):
    """curate reads and writes through Beam's FileSystems: gs:// there needs Beam's GCS client."""
    without(monkeypatch, "google.cloud.storage")
    (tmp_path / "p.txt").write_text("a red boat\n")
    line = one_line(capsys, curate.main, ["--input", str(tmp_path / "p.txt"), "--output", "gs://dd-bucket/cur"])
    assert line.endswith("gs:// paths need google.cloud.storage, which is not installed here: "
                         "pip install 'diffusion-distill[gcp]'"), line
    without(monkeypatch, "boto3")
    line = one_line(capsys, curate.main, ["--input", "s3://dd-bucket/p.txt", "--output", str(tmp_path / "o")])
    assert "s3:// paths need boto3" in line and "diffusion-distill[aws]" in line
    assert not (tmp_path / "o").exists()


def test_the_dataflow_runner_without_its_extra_is_one_line_before_work(capsys, monkeypatch, tmp_path):
    without(monkeypatch, "apache_beam.runners.dataflow.internal.apiclient")
    (tmp_path / "p.txt").write_text("a red boat\n")
    out = tmp_path / "out"
    line = one_line(capsys, dump.main, ["--prompts", str(tmp_path / "p.txt"), "--output", str(out), "--teacher", "tiny",
                                        "--runner=DataflowRunner", "--project=dd-project", "--region=us-central1"])
    assert line == ("distill dump: error: --runner DataflowRunner needs Beam's Google Cloud packages, which are not "
                    "installed here: pip install 'diffusion-distill[gcp]'")
    assert not out.exists()
    common.check_runner(["--runner=DirectRunner"])  # a local runner needs no extra


def test_the_dry_run_flag_is_read_as_beam_keeps_it():
    from apache_beam.options.pipeline_options import PipelineOptions

    assert common.is_dry_run(PipelineOptions(["--runner=DataflowRunner", "--dry_run=True"]))
    assert not common.is_dry_run(PipelineOptions(["--runner=DataflowRunner", "--dry_run=False"]))  # a string, set
    assert not common.is_dry_run(PipelineOptions(["--runner=DirectRunner", "--dry_run=True"]))  # Direct runs anyway


def test_the_extras_are_declared_and_named_in_the_readme():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["gcp"] == ["apache-beam[gcp,dask]>=2.77,<2.78", "gcsfs"]
    assert "s3fs" in extras["aws"]
    beam = next(d for d in project["dependencies"] if d.startswith("apache-beam"))
    assert beam.split("]", 1)[1] == extras["gcp"][0].split("]", 1)[1]  # the same Beam either way
    readme = (ROOT / "README.md").read_text()
    assert "pip install 'diffusion-distill[gcp]'" in readme and "pip install 'diffusion-distill[aws]'" in readme
