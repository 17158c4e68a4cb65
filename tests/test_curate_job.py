"""The curate job end to end, offline: img2dataset against a local HTTP server (some URLs broken),
the webdataset reader on the shards it wrote, and the whole job on a small mixed input with
planted drops, rejects and duplicates."""

import base64
import http.server
import io
import json
import re
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from filters.aesthetic import AestheticMLP
from filters.config import CurateConfig
from pipelines import curate
from pipelines.curate.sources import new_record, plan_inputs, read_split


def noise_image(seed, size, fmt):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


RED = noise_image(1, (64, 48), "JPEG")
# path -> (caption, status, content type, body, Content-Length to claim)
ROUTES = {
    "/img/red.jpg": ("a noisy red test image", 200, "image/jpeg", RED, None),
    "/img/blue.png": ("a noisy blue test image", 200, "image/png", noise_image(2, (80, 80), "PNG"), None),
    "/img/wide.jpg": ("a very wide test image", 200, "image/jpeg", noise_image(3, (96, 24), "JPEG"), None),
    "/img/red-copy.jpg": ("a copy of the red test image", 200, "image/jpeg", RED, None),
    "/img/small.jpg": ("a tiny test image", 200, "image/jpeg", noise_image(5, (16, 16), "JPEG"), None),
    "/img/missing.jpg": ("an image that is not there", 404, "text/plain", b"not found", None),
    "/img/truncated.jpg": ("an image cut off in transit", 200, "image/jpeg", RED[:500], len(RED)),
    "/img/half.jpg": ("an image with half its bytes", 200, "image/jpeg", RED[:300], None),
    "/img/page.html": ("a web page instead of an image", 200, "text/html", b"<html>hello</html>", None),
}
EXPECTED_STATUS = {"success": 5, "failed_to_download": 2, "failed_to_resize": 2}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path not in ROUTES:
            self.send_error(404)
            return
        _, status, ctype, body, length = ROUTES[self.path]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length or len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _json_line(record):
    return json.dumps({k: record.get(k) for k in ("key", "caption", "url", "image_ref", "width", "height", "reason", "detail")})


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    """The DownloadImages stage (real img2dataset, one batch) over every route."""
    out = tmp_path_factory.mktemp("download")
    records = [{**new_record("laion", "routes.parquet", i, caption, url=server + path), "caption": caption,
                "reason": None} for i, (path, (caption, *_)) in enumerate(ROUTES.items())]
    cfg = CurateConfig(download_image_size=32, download_threads=4, download_timeout=5)
    p = BeamTestPipeline()
    ok, failed = p | beam.Create(records) | curate.DownloadImages(str(out), cfg)
    ok | "Ok" >> beam.Map(_json_line) | "WriteOk" >> beam.io.WriteToText(str(out / "ok"), shard_name_template="")
    failed | "Failed" >> beam.Map(_json_line) | "WriteFailed" >> beam.io.WriteToText(str(out / "failed"), shard_name_template="")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(MetricsFilter())["counters"]}
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    return {"out": out, "ok": read("ok"), "failed": read("failed"), "counters": counters}


def test_download_counts_broken_urls_by_status(downloaded):
    counters = downloaded["counters"]
    assert {k[len("download_"):]: v for k, v in counters.items() if k.startswith("download_")} == EXPECTED_STATUS
    assert counters["rejected_download_failed"] == 4
    failed = {r["url"].rsplit("/", 1)[-1]: r for r in downloaded["failed"]}
    assert set(failed) == {"missing.jpg", "truncated.jpg", "half.jpg", "page.html"}
    assert all(r["reason"] == "download_failed" for r in failed.values())
    assert failed["missing.jpg"]["detail"] == "failed_to_download: HTTP Error 404: Not Found"
    assert re.match(r"failed_to_download: .*IncompleteRead", failed["truncated.jpg"]["detail"])
    assert failed["half.jpg"]["detail"] == "failed_to_resize: Image decoding error"
    assert failed["page.html"]["detail"] == "failed_to_resize: Image decoding error"
    ok = {r["caption"]: r for r in downloaded["ok"]}
    assert len(ok) == 5
    assert (ok["a very wide test image"]["width"], ok["a very wide test image"]["height"]) == (96, 24)  # original size
    ref = ok["a noisy blue test image"]["image_ref"]
    with open(ref["path"], "rb") as f:
        f.seek(ref["offset"])
        image = Image.open(io.BytesIO(f.read(ref["size"])))
        assert image.size == (32, 32)  # img2dataset resized it (keep_ratio, 32 px)


def test_wds_reader_on_img2dataset_shards(downloaded):
    folder = str(downloaded["out"] / "images")
    splits = plan_inputs([f"{folder}/*/*.tar"])
    assert [s.format for s in splits] == ["wds"]
    records = [r for s in splits for r in read_split(s)]
    by_caption = {r["caption"].decode(): r for r in records}
    assert len(records) == 5 and set(by_caption) == {ROUTES[p][0] for p, v in ROUTES.items() if v[1] == 200 and
                                                      p not in ("/img/truncated.jpg", "/img/half.jpg", "/img/page.html")}
    red = by_caption["a noisy red test image"]
    assert red["url"].endswith("/img/red.jpg") and (red["width"], red["height"]) == (64, 48)
    assert re.fullmatch(r"wds-[0-9a-f]{8}-\d+", red["key"])
    with open(red["image_ref"]["path"], "rb") as f:
        f.seek(red["image_ref"]["offset"])
        assert f.read(2) == b"\xff\xd8"  # a JPEG


# --------------------------------------------------------------------------------------------
# the whole job on a small mixed input
# --------------------------------------------------------------------------------------------

LONG = " ".join(["word"] * 70)


def write_inputs(tmp, downloaded):
    pq.write_table(pa.table({
        "SAMPLE_ID": list(range(8)), "URL": [f"http://laion/{i}.jpg" for i in range(8)],
        "TEXT": pa.array([b"a cozy cabin in a snowy forest", b"an unsafe picture description here",
                          b"a watermarked stock photo of a beach", b"a very tall narrow banner image",
                          b"a blurry low quality photo of a parking lot", None, b"\xff bad bytes",
                          b"a cozy cabin in a snowy forest"], pa.binary()),
        "WIDTH": [640, 640, 640, 100, 640, 640, 640, 640], "HEIGHT": [480, 480, 480, 1000, 480, 480, 480, 480],
        "similarity": [0.3] * 8, "punsafe": [0.01, 0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
        "pwatermark": [0.1, 0.1, 0.95, 0.1, 0.1, 0.1, 0.1, 0.1],
        "AESTHETIC_SCORE": [6.5, 6.0, 6.0, 6.0, 3.0, 6.0, 6.0, 7.0],
    }), tmp / "laion.parquet")
    (tmp / "prompts.txt").write_bytes("\n".join([
        "a red bicycle leaning on a wall", "hi", "a red bicycle  leaning on a wall",
        "A Red Bicycle leaning on a wall", LONG, "\udcff", "\uff46\uff55\uff4c\uff4c width caption about a lighthouse",
    ]).encode("utf-8", "surrogateescape"))
    (tmp / "prompts.jsonl").write_text('{"caption": "a watercolor painting of a fox in the snow"}\n{"caption": null}\n'
                                       'not json\n{"prompt": "an astronaut riding a horse on the moon"}\n')
    coco_captions = ["a man riding a wave on top of a surfboard", "two dogs playing with a frisbee in a park",
                     "a plate of pasta with tomato sauce and basil", "a train pulling into a busy station",
                     "a cat sleeping on a laptop keyboard"]
    (tmp / "captions_train2017.json").write_text(json.dumps({
        "images": [{"id": 9, "coco_url": "http://coco/9.jpg", "width": 640, "height": 480},
                   {"id": 25, "coco_url": "http://coco/25.jpg", "width": 500, "height": 375}],
        "annotations": [{"id": 100 + i, "image_id": 9, "caption": c} for i, c in enumerate(coco_captions)]
        + [{"id": 200, "image_id": 25, "caption": "a giraffe eating leaves from a tall tree"},
           {"id": 201, "image_id": 25, "caption": None}]}))
    with tarfile.open(tmp / "extra.tar", "w") as tar:
        for name, data in [("s1.jpg", b"\xff\xd8 this is not really a jpeg"), ("s1.txt", b"a sample whose image is broken"),
                           ("s2.txt", b"a caption only sample in a shard")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # aesthetic predictor for the tiny CLIP (32-d): every image scores 6.0 (the final bias)
    state = {k: torch.zeros_like(v) for k, v in AestheticMLP(32).state_dict().items()}
    state["layers.7.bias"][0] = 6.0
    torch.save(state, tmp / "aesthetic.pth")
    (tmp / "config.json").write_text(json.dumps({"min_image_side": 20, "semdedup_eps": 0.002, "kmeans_clusters": 2}))
    return [str(tmp / n) for n in ("laion.parquet", "prompts.txt", "prompts.jsonl", "captions_train2017.json", "extra.tar")] + [
        f"{downloaded['out']}/images/*/*.tar"]


def job_args(tmp, inputs, out):
    return [a for i in inputs for a in ("--input", i)] + [
        "--output", str(out), "--preset", "tiny", "--config", str(tmp / "config.json"),
        "--aesthetic_weights", str(tmp / "aesthetic.pth"), "--aesthetic_threshold", "5"]


@pytest.fixture(scope="module")
def job(downloaded, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    inputs = write_inputs(tmp, downloaded)
    summary = curate.run(job_args(tmp, inputs, tmp / "out"), test_pipeline=BeamTestPipeline())
    manifest = pq.read_table(tmp / "out" / "manifest.parquet").to_pylist()
    rejects = pq.read_table(tmp / "out" / "rejects.parquet").to_pylist()
    return {"tmp": tmp, "inputs": inputs, "summary": summary, "manifest": manifest, "rejects": rejects}


def test_job_counts_add_up(job):
    manifest, rejects, summary = job["manifest"], job["rejects"], job["summary"]
    assert len(manifest) + len(rejects) == 33  # 8 LAION + 7 txt + 4 jsonl + 7 COCO + 5 img2dataset + 2 extra
    assert (summary["input"], summary["kept"], summary["filtered"], summary["duplicate"], summary["rejected"]) == (33, 14, 8, 4, 7)
    assert sum((r["fate"] == "kept") for r in manifest) == 14
    assert [r["key"] for r in manifest] == sorted(r["key"] for r in manifest)
    assert len({r["key"] for r in manifest + rejects}) == 33
    assert all("." not in r["key"] and r["key"].isascii() for r in manifest)


def test_job_planted_reasons(job):
    by_caption = {r["caption"]: r for r in job["manifest"]}
    reason = lambda c: by_caption[c]["reason"]  # noqa: E731
    assert reason("an unsafe picture description here") == "punsafe_above_threshold"
    assert reason("a watermarked stock photo of a beach") == "pwatermark_above_threshold"
    assert reason("a very tall narrow banner image") == "aspect_ratio_too_large"
    assert reason("a blurry low quality photo of a parking lot") == "aesthetic_below_threshold"
    assert reason("hi") == "too_few_words"
    assert reason(" ".join(["word"] * 70)) == "too_many_words"
    assert reason("a very wide test image") == "aspect_ratio_too_large"
    assert reason("a tiny test image") == "image_too_small"
    # exact duplicates: LAION's copy with the higher AESTHETIC_SCORE (7.0 > 6.5) is kept
    cabins = [r for r in job["manifest"] if r["caption"] == "a cozy cabin in a snowy forest"]
    kept = [r for r in cabins if (r["fate"] == "kept")]
    assert len(cabins) == 2 and len(kept) == 1 and kept[0]["laion_aesthetic"] == 7.0
    dropped = [r for r in cabins if not (r["fate"] == "kept")][0]
    assert dropped["reason"] == "exact_duplicate" and dropped["duplicate_of"] == kept[0]["key"]
    bikes = [r for r in job["manifest"] if r["caption"] == "a red bicycle leaning on a wall"]
    assert sorted(r["reason"] or "kept" for r in bikes) == ["exact_duplicate", "kept"]
    # semantic duplicate on text: CLIP's tokenizer lower-cases, so the embeddings are identical
    title = by_caption["A Red Bicycle leaning on a wall"]
    assert title["reason"] == "semantic_duplicate" and title["dedup_on"] == "text"
    assert title["duplicate_of"] == [r for r in bikes if (r["fate"] == "kept")][0]["key"] and title["duplicate_similarity"] > 0.999
    # semantic duplicate on images: the same bytes at two URLs; smallest id kept (equal aesthetic)
    red, copy = by_caption["a noisy red test image"], by_caption["a copy of the red test image"]
    first, second = sorted([red, copy], key=lambda r: r["key"])
    assert (first["fate"] == "kept") and first["n_duplicates"] == 1 and first["dedup_on"] == "image"
    assert second["reason"] == "semantic_duplicate" and second["duplicate_of"] == first["key"]
    assert first["aesthetic_score"] == pytest.approx(6.0) and first["has_image"]
    assert by_caption["full width caption about a lighthouse"]["fate"] == "kept"  # NFKC
    assert by_caption["a caption only sample in a shard"]["fate"] == "kept"
    assert sum(r["source"] == "coco" and (r["fate"] == "kept") for r in job["manifest"]) == 6
    assert {r["stage"] for r in job["manifest"] if (r["fate"] == "kept")} == {None}


def test_job_rejects_listed_with_reasons(job):
    reasons = sorted(r["reason"] for r in job["rejects"])
    assert reasons == sorted(["null_caption", "non_utf8_caption", "non_utf8_caption", "null_caption", "bad_json",
                              "null_caption", "broken_image"])
    broken = [r for r in job["rejects"] if r["reason"] == "broken_image"][0]
    assert broken["stage"] == "images" and broken["raw_caption"] == repr("a sample whose image is broken")


def test_job_embeddings_and_report(job):
    out = job["tmp"] / "out"
    text = pa.concat_tables([pq.read_table(p) for p in sorted((out / "embeddings").glob("text-*.parquet"))])
    image = pa.concat_tables([pq.read_table(p) for p in sorted((out / "embeddings").glob("image-*.parquet"))])
    assert image.num_rows == 3  # red, blue, red copy (wide and tiny were dropped before CLIP)
    vectors = np.array(text.column("embedding").to_pylist(), np.float32)
    assert vectors.shape[1] == 32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    html = (out / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) == 4 and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "input 33 = kept 14 + filtered 8 + duplicate 4 + rejected 7" in html
    from core.report_html import MARKER

    assert MARKER in html and re.findall(r'<figure class="plot"><img alt="([^"]+)"', html) == [
        "funnel", "aesthetic_scores", "clip_scores", "clusters"]  # every stage ran here: no "did not run" line
    assert "did not run" not in html and "{" not in re.sub(r"<style>.*?</style>", "", html, flags=re.S)
    for reason in ("semantic_duplicate", "exact_duplicate", "broken_image", "kept"):
        assert f"<h3>{reason}</h3>" in html
    funnel = dict(json.loads((out / "summary.json").read_text())["funnel"])
    assert funnel["input"] == 33 and funnel["semantic dedup"] == 14
    assert funnel["caption decoded"] == 33 - 6  # 5 unreadable captions + 1 bad JSON line
    assert funnel["aesthetic"] == funnel["image decoded + size"] - 1
    assert "downloaded" not in funnel  # this job reads tars of images and downloads none: no funnel row for it


def test_per_record_path_writes_the_same_outputs(job):
    """The job above ran its caption stages on Arrow batches (the default); one record per element
    (``--record_batch 0``, the reference path) writes the same manifest, rejects and summary."""
    from test_curate_batched import assert_same, outputs

    tmp = job["tmp"]
    curate.run(job_args(tmp, job["inputs"], tmp / "per_record") + ["--record_batch", "0"],
               test_pipeline=BeamTestPipeline())
    assert_same(outputs(tmp / "per_record"), outputs(tmp / "out"))


def test_bad_arguments_fail_before_the_pipeline(tmp_path, capsys):
    with pytest.raises(ValueError, match="nope.txt.*matches no file"):
        curate.run(["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o")])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"--input_format 'csv' is not one of laion\|coco\|txt\|jsonl\|wds"):
        curate.run(["--input", str(tmp_path / "a.csv"), "--input_format", "csv", "--output", str(tmp_path / "o")])
    pq.write_table(pa.table({"URL": ["u"]}), tmp_path / "no_text.parquet")
    assert curate.main(["--input", str(tmp_path / "no_text.parquet"), "--output", str(tmp_path / "o")]) == 2
    assert "no_text.parquet" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a b c\n")
    with pytest.raises(ValueError, match="--min_words.*'many'"):
        curate.run(["--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o"), "--min_words", "many"])
    with pytest.raises(ValueError, match=r"--allocator 'jemalloc' is not one of steady\|default"):
        curate.run(["--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o"), "--allocator", "jemalloc"])
    with pytest.raises(ValueError, match="semdedup_eps must be in"):
        curate.run(["--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o"), "--semdedup_eps", "-1"])
    with pytest.raises(ValueError, match="aesthetic_weights '/no/such.pth' not found"):
        curate.run(["--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o"), "--preset", "tiny",
                    "--aesthetic_weights", "/no/such.pth"])
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_job_with_download_stage(server, tmp_path):
    """LAION rows whose URLs point at the local server, fetched by the job itself."""
    paths = list(ROUTES)
    pq.write_table(pa.table({"URL": [server + p for p in paths], "TEXT": [ROUTES[p][0] for p in paths],
                             "punsafe": [0.0] * len(paths)}), tmp_path / "laion.parquet")
    summary = curate.run(["--input", str(tmp_path / "laion.parquet"), "--output", str(tmp_path / "out"),
                          "--preset", "tiny", "--download_images", "true", "--download_image_size", "32",
                          "--download_threads", "4", "--min_image_side", "20", "--semdedup_eps", "0.002"],
                         test_pipeline=BeamTestPipeline())
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert sorted(r["detail"].split(":")[0] for r in rejects) == ["failed_to_download"] * 2 + ["failed_to_resize"] * 2
    manifest = {r["caption"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert (summary["input"], summary["kept"], summary["filtered"], summary["duplicate"], summary["rejected"]) == (9, 2, 2, 1, 4)
    assert manifest["a very wide test image"]["reason"] == "aspect_ratio_too_large"
    assert manifest["a tiny test image"]["reason"] == "image_too_small"
    assert manifest["a copy of the red test image"]["reason"] == "semantic_duplicate"  # larger id
    assert manifest["a noisy red test image"]["has_image"] and manifest["a noisy blue test image"]["fate"] == "kept"
    assert len(list((tmp_path / "out" / "images").glob("*/*.tar"))) == 1
