"""The HTML reports: the one template (``core.report_html``) and what each writer puts through it."""

from __future__ import annotations

import base64
import html as htmllib
import io
import re

import numpy as np
import pytest
from PIL import Image

from core import report_html as R

TILE = re.compile(r'<figure class="tile"[^>]*><img alt="([^"]*)" src="data:image/png;base64,([^"]+)" '
                  r'width="(\d+)" height="(\d+)"><figcaption>([^<]*)</figcaption></figure>')


def tiles(page: str) -> list[tuple[str, Image.Image]]:
    """(caption under the image, the image) for every image of a template image grid."""
    out = []
    for alt, data, width, height, caption in TILE.findall(page):
        assert alt == caption
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.size == (int(width), int(height))
        out.append((htmllib.unescape(caption), image))
    return out


def body(page: str) -> str:
    """The page without its <style> block (the only place a '{' belongs)."""
    return re.sub(r"<style>.*?</style>", "", page, flags=re.S)


# ----------------------------------------------------------------------------------------------
# the template
# ----------------------------------------------------------------------------------------------


def test_template_escapes_scrolls_tables_and_upscales_small_images_nearest_x4():
    small = np.zeros((32, 32, 3), np.uint8)
    small[:16, :16] = (255, 0, 0)
    big = np.full((200, 160, 3), 7, np.uint8)
    page = R.render("a <b> title", [R.section("S & T", R.text("1 < 2"), R.table(["a", "b"], [[1, 2.5], [None, "x<y"]]),
                                              R.kv_table({"outer": {"inner": [1, 2]}, "flag": True}),
                                              R.image_grid([("row <1>", [(small, "a red <square>"), (big, "grey")])]))],
                    verdict=(False, "target missed: 2 against 1"))
    assert f'<meta name="generator" content="{R.MARKER}">' in page
    assert "<h1>a &lt;b&gt; title</h1>" in page and "<p>1 &lt; 2</p>" in page and "<h2>S &amp; T</h2>" in page
    assert '<p class="verdict missed">target missed: 2 against 1</p>' in page
    assert '<div class="scroll"><table>' in page and "overflow-x:auto" in page and "max-width:1200px" in page
    assert '<td class="num">2.5</td>' in page and "<td>-</td>" in page and "<td>x&lt;y</td>" in page
    assert "<td>outer.inner</td><td>1, 2</td>" in page and "{" not in body(page)
    assert "image-rendering:pixelated" in page and "overflow-wrap:anywhere" in page
    (cap1, im1), (cap2, im2) = tiles(page)
    assert (cap1, cap2) == ("a red <square>", "grey")
    assert im1.size == (128, 128) and im2.size == (160, 200)  # 32 px x4; 200 px as it is
    pixels = np.asarray(im1.convert("RGB"))
    assert (pixels[:64, :64] == (255, 0, 0)).all() and (pixels[64:, :] == 0).all()  # nearest: no blended edge
    assert '<div class="rowlabel">row &lt;1&gt;</div>' in page


# ----------------------------------------------------------------------------------------------
# distill eval
# ----------------------------------------------------------------------------------------------


def _eval_payload():
    results = {"teacher": {"20": {"adherence": 1.0, "adherence_se": 0.0, "frechet_analyser": 3.2, "latency_s": 0.21,
                                  "unet_latency_s": 0.0051, "images_per_s": 5.1, "num_images": 8},
                           "4": {"adherence": 0.91, "adherence_se": 0.012, "frechet_analyser": 9.7, "latency_s": 0.05,
                                 "unet_latency_s": 0.0051, "images_per_s": 20.3, "num_images": 8}},
               "student": {"4": {"adherence": 1.0, "adherence_se": 0.0, "frechet_analyser": 4.1, "latency_s": 0.02,
                                 "unet_latency_s": 0.0017, "images_per_s": 48.0, "num_images": 8}}}
    return {"results": results, "student": {"arch": {"nested": [1, 2]}},
            "protocol": {"captions": "c.txt", "format": "txt", "num_images": 8, "image_size": 32, "guidance_scale": 3.0,
                         "teacher": "shapes", "metrics": ["adherence", "frechet_analyser"]}}


def test_eval_report_is_two_figures_a_table_and_captioned_samples_without_raw_json(tmp_path):
    from students.evaluation import report

    rows = [np.full((3, 32, 32, 3), v, np.uint8) for v in (10, 20, 30)]
    captions = ["a red circle", "a blue square", "a green <triangle>"]
    path = report.write_report(_eval_payload(), str(tmp_path / "report.html"), None,
                               (rows, ["teacher 20 st", "teacher 4 st", "student 4 st"], captions))
    page = open(path, encoding="utf-8").read()
    assert R.MARKER in page and "{" not in body(page)  # no JSON dump anywhere
    assert '<a href="metrics.json">' in page
    figures = re.findall(r'<figure class="plot"><img alt="([^"]+)"', page)
    assert figures == ["quality vs steps", "latency vs steps"]
    # the table: a row per (model, steps), lower-is-better marked, ± the standard error, latency in ms
    assert "<th>frechet_analyser ↓</th>" in page and "<th>ms / image</th>" in page
    assert "<td>0.91 ± 0.012</td>" in page and '<td class="num">50</td>' in page and '<td class="num">1.7</td>' in page
    assert page.count('<tr><td>teacher</td><td class="num">') == 2
    assert page.count('<tr><td>student</td><td class="num">') == 1
    # every sample with its caption under it, 32 px shown at 128
    shown = tiles(page)
    assert [c for c, _ in shown] == captions * 3
    assert all(im.size == (128, 128) for _, im in shown)
    assert [int(np.asarray(im)[0, 0, 0]) for _, im in shown] == [10] * 3 + [20] * 3 + [30] * 3


def test_eval_axes_come_from_the_data_and_lower_is_better_is_labelled():
    from students.evaluation import report

    assert report.y_range([1.0, 1.0]) == pytest.approx((0.9, 1.1))  # flat: a band 10% of its size, not 0.96-1.04
    lo, hi = report.y_range([0.30, 0.32])
    assert lo == pytest.approx(0.297) and hi == pytest.approx(0.323)
    assert report.y_range([20.0, 210.0])[0] == 0.0  # never below zero for non-negative values
    assert report.label("fid") == "FID (lower is better)" and report.label("colour_fd") == "colour_fd (lower is better)"
    assert report.label("adherence") == "adherence (higher is better)"
    assert report.metric_keys(_eval_payload()["results"]) == ["adherence", "frechet_analyser"]
    assert report.latency_figure({"student": {"4": {"latency_s": None}}}) is None


# ----------------------------------------------------------------------------------------------
# curate and filter
# ----------------------------------------------------------------------------------------------


def _curate_stats(funnel, **scores):
    return {"input": 10, "kept": 6, "filtered": 0, "duplicate": 2, "rejected": 2,
            "by_reason": {"filtered": {}, "duplicate": {"exact_duplicate": 2}, "rejected": {"null_caption": 2}},
            "funnel": funnel, "aesthetic_scores": scores.get("aesthetic", []), "clip_scores": scores.get("clip", []),
            "cluster_sizes": [], "duplicate_group_sizes": {},
            "examples": {"kept": [{"key": "k1", "caption": "a red <circle>"}], "exact_duplicate": [{"key": "k2"}]}}


def test_curate_report_lists_only_the_stages_that_ran_and_plots_only_scores_that_exist(tmp_path):
    from pipelines.curate import report

    funnel = [("input", 10), ("readable", 10), ("caption decoded", 8), ("caption/size rules", 8), ("exact dedup", 6),
              ("downloaded", 6), ("image decoded + size", 6), ("aesthetic", 6), ("CLIP score", 6), ("semantic dedup", 6)]
    config = {"exact_dedup": True, "download_images": False, "clip_model": None, "semdedup_eps": None,
              "aesthetic_threshold": None, "clip_score_threshold": None}
    summary = report.write_report(_curate_stats(funnel), str(tmp_path), config, None)
    assert [label for label, _ in summary["funnel"]] == ["input", "readable", "caption decoded", "caption/size rules",
                                                         "exact dedup"]
    page = (tmp_path / "report.html").read_text()
    assert R.MARKER in page and "{" not in body(page)
    assert re.findall(r'<figure class="plot"><img alt="([^"]+)"', page) == ["funnel"]
    assert "aesthetic: the stage did not run" in page and "CLIP score: the stage did not run" in page
    assert "semantic dedup: the stage did not run" in page
    assert "<td>a red &lt;circle&gt;</td><td>k1</td>" in page and "<td>exact_dedup</td><td>True</td>" in page
    # with CLIP scores, the CLIP stages ran: their funnel rows and histogram are back
    summary = report.write_report(_curate_stats(funnel, clip=[0.2, 0.3, 0.25]), str(tmp_path),
                                  dict(config, clip_model="dd-tiny-clip", semdedup_eps=0.05), None)
    assert [label for label, _ in summary["funnel"]] == ["input", "readable", "caption decoded", "caption/size rules",
                                                         "exact dedup", "image decoded + size", "CLIP score",
                                                         "semantic dedup"]
    page = (tmp_path / "report.html").read_text()
    assert re.findall(r'<figure class="plot"><img alt="([^"]+)"', page) == ["funnel", "clip_scores"]
    assert "aesthetic: the stage did not run" in page and "CLIP score: the stage did not run" not in page


def test_curate_stage_that_removed_records_counts_as_run_whatever_the_config():
    from pipelines.curate import report

    funnel = [("input", 10), ("readable", 10), ("caption decoded", 10), ("caption/size rules", 10),
              ("exact dedup", 10), ("downloaded", 7), ("image decoded + size", 7)]
    ran = report.stages_run(_curate_stats(funnel), {"exact_dedup": False, "download_images": False})
    assert "downloaded" in ran and "exact dedup" not in ran and "image decoded + size" not in ran


def test_filter_report_without_scores_or_dedup_has_no_such_plot_or_funnel_row(tmp_path):
    from pipelines.filter import plan, report

    rows = [plan.empty_row(f"k{i}", plan.KEPT) for i in range(3)] + \
        [plan.empty_row("k9", plan.REJECTED, "dump", "null_caption")]
    counts = plan.count_fates(rows)
    report.write_report(str(tmp_path), str(tmp_path / "no_parent"), rows, counts,
                        {"aesthetic_score": None, "clip_score": None},
                        {"lineage": {"filter_recipe": {"semdedup_eps": None}}, "clip_score_cutoff": None}, 2)
    page = (tmp_path / "report.html").read_text()
    assert R.MARKER in page and "{" not in body(page)
    assert re.findall(r'<figure class="plot"><img alt="([^"]+)"', page) == ["funnel"]
    assert "aesthetic: no sample has a score, the stage did not run" in page
    assert "no duplicate groups" in page and "no images: no example sample has a decoded image" in page
    assert report.ran_steps(rows, {"aesthetic_score": None, "clip_score": None}, {}) == {
        "input keys", "generated by the dump", "scores readable", "copied (final shards)"}
    assert report.ran_steps(rows, {"aesthetic_score": 5.0, "clip_score": None},
                            {"lineage": {"filter_recipe": {"semdedup_eps": 0.1}}}) >= {"aesthetic", "semantic dedup"}
    assert "<td>lineage.filter_recipe.semdedup_eps</td><td>-</td>" in page


def test_filter_grid_shows_each_image_with_its_prompt_key_and_scores():
    from pipelines.filter import plan, report

    row = plan.empty_row("key-1", plan.KEPT, aesthetic_score=5.25, clip_score=0.3125)
    grid = report.render_grids({"kept": [row]}, {"key-1": Image.new("RGB", (32, 32), "red")}, {"key-1": "a red ball"})
    page = R.render("t", [R.section("s", grid)])
    ((caption, image),) = tiles(page)
    assert caption == "a red ball\nkey-1 · aes 5.25 · clip 0.312" and image.size == (128, 128)


# ----------------------------------------------------------------------------------------------
# evolve and the demo
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("last, words", [(12.5, "target missed: 12.500 ms against 10.000 ms"),
                                         (9.75, "target met: 9.750 ms against 10.000 ms")])
def test_evolve_report_says_target_met_or_missed_at_the_top(tmp_path, last, words):
    from students.search import evolve as E

    layouts = {"down_layouts": ["R", "T"], "mid_layout": "R", "up_layouts": ["R R"]}
    records = [{"iteration": i, "step": 2 * i, "metric_name": "adherence", "metric": 0.5, "layouts": layouts,
                "predicted_ms": p, "measured_ms": p + 0.1, "target_ms": 10.0, "scores": {},
                "actions": [{"kind": "remove", "module": "down.0"}]} for i, p in ((1, 15.0), (2, last))]
    E.write_report(str(tmp_path), records, 10.0, "ckpt")
    page = (tmp_path / "report.html").read_text()
    assert R.MARKER in page
    verdict = re.search(r'<p class="verdict (met|missed)">([^<]*)</p>', page)
    assert verdict.group(2) == words and verdict.group(1) == words.split()[1].rstrip(":")
    assert page.index("verdict") < page.index("<section>")  # at the top, before the plot
    assert f'<td class="num">{last:.3f}</td><td class="num">{last + 0.1:.3f}</td>' in page
    assert "<td>R / T | R | R R</td><td>remove down.0</td>" in page


def test_demo_report_goes_through_the_template(tmp_path):
    from diffusion_distill import demo

    (tmp_path / "eval").mkdir()
    Image.new("RGB", (300, 100), "white").save(tmp_path / "eval" / "grid.png")
    metrics = {"protocol": {"guidance_scale": 3.0, "num_images": 8}, "results": {
        "teacher": {"20": {"adherence": 0.98, "adherence_se": 0.01, "exact": 0.9, "frechet_analyser": 3.0,
                           "latency_s": 0.2, "unet_latency_s": 0.005}},
        "student": {"4": {"adherence": 0.95, "adherence_se": 0.02, "exact": 0.8, "frechet_analyser": 4.0,
                          "latency_s": 0.02, "unet_latency_s": None}}}}
    curated = {"input": 10, "kept": 8, "filtered": 1, "duplicate": 1, "rejected": 0}
    from shards.record import SCHEMA_VERSION
    from shards.schema import DatasetInfo

    dataset = DatasetInfo(schema_version=SCHEMA_VERSION, recipe={}, recipe_hash="0" * 16, shards=[],
                          totals={"samples_written": 16, "samples_rejected": 0, "bytes": 2**20})
    cost = {"teacher": {"parameters": 100, "macs": 1000}, "student": {"parameters": 28, "macs": 340}}
    path = demo.write_report(str(tmp_path), curated, dataset, metrics, {"curate": 3.0, "train": 60.0},
                             demo.describe_student(None, 4, demo.bundled_student()), cost)
    page = open(path, encoding="utf-8").read()
    assert R.MARKER in page and "{" not in body(page)
    assert "<tr><td>student</td><td class=\"num\">4</td><td>0.950 ± 0.020</td>" in page
    assert '<td class="num">0.28</td><td class="num">0.34</td><td class="num">nan</td>' in page
    assert "the bundled shapes_small student" in page and "&lt;code&gt;" not in page
    assert re.findall(r'<figure class="plot"><img alt="([^"]+)"', page)[0].startswith("a row per model")
    assert '<a href="eval/report.html">' in page and '<a href="curate/report.html">' in page


def test_no_report_writer_assembles_html_itself():
    """Every writer renders through the template: none of them holds an HTML tag of its own."""
    import inspect

    from diffusion_distill import demo
    from pipelines.curate import report as curate_report
    from pipelines.filter import report as filter_report
    from students.evaluation import report as eval_report
    from students.search import evolve

    for module in (demo, curate_report, filter_report, eval_report):
        source = inspect.getsource(module)
        assert "core import report_html" in source, module.__name__
        assert not re.search(r"<(html|body|table|tr|td|img|h1|h2|p)\b", source), module.__name__
    source = inspect.getsource(evolve.write_report)
    assert "R.render(" in source and not re.search(r"<(html|body|table|tr|td|img|h1|p)\b", source)
