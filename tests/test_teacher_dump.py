"""The teacher dump job on Beam: accounting, resume, kill-and-rerun, runners, bad arguments."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import dump_argv
from pipelines import teacher_dump
from shards.loader import dataset_shards, record_pipeline
from shards.verify import verify_shard

# conftest's DUMP_DEFAULTS pin cpu_threads 2: Dask workers otherwise run torch on 1 thread (other float rounding)
BASE = dict(num_inference_steps=2, samples_per_shard=2, batch_size=2, feature_layers="mid_block", num_feature_steps=1)


def argv(prompts, out, **overrides) -> list[str]:
    return dump_argv(prompts, out, **{**BASE, **overrides})


def write_prompts(path, n=6):
    path.write_text("".join(f"a photo of thing number {i}\n" for i in range(n)))
    return str(path)


def dump(prompts, out, *beam_flags, **overrides):
    return teacher_dump.run([*argv(prompts, out, **overrides), *beam_flags])


def tree_bytes(out):
    """Every file of a finished dump except the plan, keyed by relative path."""
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), out)
            if not rel.startswith("_plan"):
                files[rel] = open(os.path.join(root, name), "rb").read()
    return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    prompts = write_prompts(tmp / "p.txt")
    dataset = dump(prompts, tmp / "out")
    return prompts, tmp / "out", dataset


def test_dump_writes_every_planned_sample_readable_by_the_reader(reference):
    _, out, dataset = reference
    assert dataset["totals"]["samples_written"] == 6 and len(dataset["shards"]) == 3
    keys = sorted(r.key for r in record_pipeline(dataset_shards(str(out))))
    assert keys == [f"p{i:07d}-s0" for i in range(6)]
    rec = next(iter(record_pipeline(dataset_shards(str(out))[:1])))
    assert rec.latents.shape == (3, 4, 16, 16) and rec.feats["mid_block"].shape == (1, 64, 8, 8)
    assert rec.meta["timesteps"] == dataset["timesteps"] and len(dataset["timesteps"]) == 2
    uncond = np.load(out / dataset["shared"]["negative_prompt_embeds"], allow_pickle=False)
    assert uncond.shape == (77, 32)
    assert all(verify_shard(str(out), i) == [] for i in range(3))


def test_rejects_are_counted_and_input_adds_up(tmp_path, capsys):
    long = " ".join(["word"] * 90)
    lines = [b"a good caption", b"", "caf\xe9".encode("latin-1"), long.encode(), b"another good caption"]
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"\n".join(lines) + b"\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(o) for o in [
        {"key": "ok", "caption": "a cat"}, {"key": "nan", "caption": "a dog", "guidance_scale": 1e38},
        {"key": "null", "caption": None}, {"key": "bad.id", "caption": "dots"}]) + "\n")
    a = dump(str(prompts), tmp_path / "a")
    t = a["totals"]
    assert t["prompts_in"] == 5 and t["prompts_rejected"] == 2 and t["samples_written"] == 3
    assert a["rejects_by_reason"] == {"empty_caption": 1, "non_utf8_caption": 1} and t["captions_truncated"] == 1
    b = dump(str(jsonl), tmp_path / "b", seeds_per_prompt=2)
    t = b["totals"]
    # 4 prompts in: 2 rejected (null, bad id); 2 x 2 seeds planned = 2 written + 2 rejected (NaN from w=1e38)
    assert (t["prompts_in"], t["prompts_rejected"], t["samples_planned"], t["samples_written"], t["samples_rejected"]) == (4, 2, 4, 2, 2)
    assert b["rejects_by_reason"] == {"null_caption": 1, "bad_key": 1, "non_finite": 2}
    summary = capsys.readouterr().err  # the summary line says it in words, most first
    assert "(rejects: 1 empty_caption, 1 non_utf8_caption) ->" in summary
    assert "(rejects: 2 non_finite, 1 bad_key, 1 null_caption) ->" in summary and "{" not in summary
    rejected = [json.loads(line) for f in sorted((tmp_path / "b" / "rejects").iterdir()) for line in f.read_text().splitlines()]
    assert sorted((r["key"], r["reason"]) for r in rejected) == sorted(
        [("nan-s0", "non_finite"), ("nan-s1", "non_finite"), ("null", "null_caption"), ("bad.id", "bad_key")])


def test_a_summary_without_rejects_says_none(capsys):
    from pipelines.dump.job import print_summary

    totals = dict(prompts_in=2, prompts_rejected=0, prompts_not_kept_by_manifest=0, samples_planned=2,
                  samples_written=2, samples_rejected=0, captions_truncated=0, bytes=2048)
    print_summary({"totals": totals, "shards": [{}], "rejects_by_reason": {}}, "out", 1.0)
    assert "(rejects: none) -> out" in capsys.readouterr().err


def test_rerun_skips_complete_shards_and_redoes_partial_ones(reference, tmp_path):
    prompts, ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    before = {n: os.stat(out / n).st_mtime_ns for n in ("000000.tar", "000002.tar")}
    (out / "000001.tar").write_bytes((out / "000001.tar").read_bytes()[:3000])  # a torn shard
    (out / ".000002.tar.tmp-deadbeef").write_bytes(b"partial")  # a killed writer's leftover
    os.remove(out / "000002.json")  # index gone: shard 2 counts as incomplete
    dump(prompts, out)
    assert os.stat(out / "000000.tar").st_mtime_ns == before["000000.tar"]  # skipped, untouched
    assert os.stat(out / "000002.tar").st_mtime_ns != before["000002.tar"]  # regenerated
    assert tree_bytes(out) == tree_bytes(ref_out)


def test_changed_recipe_over_existing_output_is_refused(reference):
    prompts, ref_out, _ = reference
    before = tree_bytes(ref_out)
    with pytest.raises(ValueError, match=r"another recipe \(num_inference_steps: 2 -> 3\)"):
        teacher_dump.run(argv(prompts, ref_out, num_inference_steps=3))
    assert tree_bytes(ref_out) == before  # refused before touching anything


def test_sigkill_then_rerun_is_byte_identical(reference, tmp_path):
    prompts, ref_out, _ = reference
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.teacher_dump", *argv(prompts, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.getcwd())
    deadline = time.monotonic() + 120
    while not (out / "000000.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset.json").exists(), "the job finished before it could be killed"
    subprocess.run(cmd, check=True, capture_output=True)
    assert tree_bytes(out) == tree_bytes(ref_out)


def test_multiprocessing_direct_runner_gives_the_same_bytes(reference, tmp_path):
    prompts, ref_out, _ = reference
    dump(prompts, tmp_path / "mp", "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    assert tree_bytes(tmp_path / "mp") == tree_bytes(ref_out)


@pytest.mark.slow  # a Dask cluster of two worker processes, like the filter job's twin test
def test_dask_runner_gives_the_same_bytes_as_direct(reference, tmp_path):
    from distributed import LocalCluster

    prompts, ref_out, _ = reference
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                      processes=True) as cluster:
        from diffusion_distill.beam_cli import main as beam_main

        beam_main(["run", "pipelines/teacher_dump.py", "--runner=Dask", f"--dask_client_address={cluster.scheduler_address}",
                   *argv(prompts, tmp_path / "dask")])
    assert tree_bytes(tmp_path / "dask") == tree_bytes(ref_out)


def test_beam_run_from_another_directory(tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", n=2)
    beam = os.path.join(os.path.dirname(sys.executable), "beam")
    proc = subprocess.run([beam, "run", "pipelines/teacher_dump.py", "--runner=Direct", *argv(prompts, tmp_path / "o")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 samples planned = 2 written + 0 rejected" in proc.stderr
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["totals"]["samples_written"] == 2


@pytest.mark.parametrize("args,message", [
    (["--prompts", "/nonexistent/p.txt"], "'/nonexistent/p.txt' does not exist"),
    (["--teacher", "sd99"], "unknown teacher 'sd99'"),
    (["--resolution", "100"], "--resolution 100 is not possible for teacher 'tiny'"),
    (["--feature_layers", "down_blocks.7"], "'down_blocks.7' is not a block"),
    (["--scheduler", "heun"], "--scheduler 'heun'"),
])
def test_bad_arguments_fail_before_any_work(reference, tmp_path, args, message):
    prompts, _, _ = reference
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace("[", r"\[")):
        teacher_dump.run([*argv(prompts, tmp_path / "o"), *args])  # a later flag wins
    assert not (tmp_path / "o").exists()


def test_manifest_missing_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['caption'\]"):
        teacher_dump.run(argv(tmp_path / "m.parquet", tmp_path / "o"))


def test_real_images_from_the_input_column_are_encoded_by_the_teacher_vae_and_bad_ones_rejected(tmp_path):
    """--real_images with a .jsonl ``image`` column: each stored image_latents equals the teacher VAE's
    encoding of that file (centre-cropped and resized to the dump's size) up to float16 storage; a missing
    file and bytes that are no image are rejected with their reasons, the rest of the shard is written."""
    import torch
    from PIL import Image

    from teachers.load import load_teacher
    from teachers.real_image import encode_images, real_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # not square: the centre crop is exercised
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"key": "a", "caption": "a red circle", "image": str(tmp_path / "a.png")},
            {"key": "missing", "caption": "a blue square", "image": str(tmp_path / "nope.png")},
            {"key": "broken", "caption": "a green triangle", "image": str(tmp_path / "broken.png")}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = dump(str(tmp_path / "p.jsonl"), tmp_path / "out", real_images=True)
    assert summary["rejects_by_reason"] == {"no_real_image": 1, "broken_image": 1}
    (rec,) = list(record_pipeline(dataset_shards(str(tmp_path / "out"))))
    teacher = load_teacher("tiny")
    size = summary["recipe"]["height"]
    image, error = real_image("tiny", "a red circle", 0, str(tmp_path / "a.png"), size, size)
    assert error is None and image.shape == (size, size, 3)
    with torch.no_grad():
        want = encode_images(teacher, [image])[0]
    assert rec.image_latents.dtype == np.float16 and rec.image_latents.shape == want.shape
    np.testing.assert_allclose(rec.image_latents.astype(np.float32), want, rtol=2e-3, atol=2e-3)  # float16 storage


def test_a_second_dump_into_one_folder_is_refused_and_the_first_finishes_as_a_lone_run(reference, tmp_path):
    """Two launchers, one output: the second is one line and exit 2 while the first runs, deletes none of
    its files, and the first's dump equals a lone run's, byte for byte."""
    from core.fs import LOCK_FILE

    prompts, ref_out, _ = reference
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "pipelines.teacher_dump", *argv(prompts, out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not (out / LOCK_FILE).exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first dump ended before it was seen"
        time.sleep(0.01)
    second = subprocess.run([sys.executable, "-m", "pipelines.teacher_dump", *argv(prompts, out)], capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert "is being written by" in second.stderr and f"pid {first.pid}" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert not (out / LOCK_FILE).exists()
    assert tree_bytes(out) == tree_bytes(ref_out)
