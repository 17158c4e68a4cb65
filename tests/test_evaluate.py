"""``distill eval``: the Frechet distance, the COCO protocol, FID/CLIP plumbing on random weights, the run."""

import json
import re
from unittest import mock

import numpy as np
import pytest
import torch

from students.evaluation import evaluate as E
from students.evaluation import metrics as M
from test_export import student_run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]  # numerics: rerun on AVX2 kernels (CI)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, saved as the state dict FID loads (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch.object(fe.torch, "load", lambda *a, **k: {}):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(net.state_dict(), path)
    return str(path)


def _with_moments(rng, mean, cov, n=64):
    """n samples whose sample mean and covariance (N - 1) are exactly ``mean`` and ``cov``."""
    x = rng.standard_normal((n, len(mean)))
    x -= x.mean(axis=0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # now exactly identity covariance
    return x @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_matches_the_closed_form_for_planted_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([4.0, 1.0, 0.25, 0.5])
    a, b = _with_moments(rng, mu1, np.diag(var1)), _with_moments(rng, mu2, np.diag(var2), n=80)
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(v1) - sqrt(v2))^2 = 5 + (1 + 1 + 0 + 0.5) = 7.5
    assert M.frechet_distance(a, b) == pytest.approx(7.5, abs=1e-9)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))  # a common rotation leaves the distance unchanged
    assert M.frechet_distance(a @ q.T, b @ q.T) == pytest.approx(7.5, abs=1e-9)
    # general covariances: the same value as torchmetrics' eigenvalue form
    from torchmetrics.image.fid import _compute_fid

    c, d = rng.standard_normal((50, 6)), rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6))
    (m1, s1), (m2, s2) = M.moments(c), M.moments(d)
    ref = float(_compute_fid(*(torch.from_numpy(v) for v in (m1, s1, m2, s2))))
    assert M.frechet_distance(c, d) == pytest.approx(ref, rel=1e-8)
    with pytest.raises(ValueError, match="N >= 2"):
        M.frechet_distance(c[:1], d)


def test_coco_protocol_picks_first_images_by_id_and_lowest_annotation_id(tmp_path):
    images = [{"id": 30, "file_name": "c.jpg"}, {"id": 10, "file_name": "a.jpg"}, {"id": 20, "file_name": "b.jpg"},
              {"id": 5, "file_name": "uncaptioned.jpg"}]
    annotations = [{"id": 7, "image_id": 10, "caption": "second caption of ten"},
                   {"id": 3, "image_id": 10, "caption": "  First caption\nof ten "},
                   {"id": 9, "image_id": 30, "caption": "only caption of thirty"},
                   {"id": 8, "image_id": 20, "caption": "caption of twenty"},
                   {"id": 1, "image_id": 20, "caption": "   "}]  # empty: never chosen
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    prompts, kind = E.load_prompts(str(path), 2)
    assert kind == "coco"
    assert [(p.image_id, p.file_name, p.caption) for p in prompts] == [(10, "a.jpg", "First caption of ten"),
                                                                        (20, "b.jpg", "caption of twenty")]
    assert [p.caption for p in E.load_prompts(str(path), 3)[0]][-1] == "only caption of thirty"
    with pytest.raises(ValueError, match="3 captioned images, fewer than --num_images 4"):
        E.load_prompts(str(path), 4)
    # references: short side resized, then center-cropped (the red middle of a blue-edged 100x50 image)
    from PIL import Image

    pixels = np.zeros((50, 100, 3), np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 25:75] = (255, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    ref = E.load_reference(str(tmp_path / "wide.png"), 32)
    assert ref.shape == (3, 32, 32) and ref.dtype == torch.float32
    assert float(ref[0].mean()) > 0.9 and float(ref[2].mean()) < 0.1


def test_fid_and_clip_score_plumbing_on_random_weights(inception_weights):
    from filters.clip_embed import clip_score, embed_images, embed_texts

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 48, 48, generator=gen), torch.rand(6, 3, 48, 48, generator=gen) ** 3
    fid = M.InceptionFID(inception_weights, feature=64)
    assert isinstance(fid, M.ReferenceMetric)
    fid.update_reference(x)
    fid.update(x, [""] * 6)
    fid_self = fid.compute()["fid"]
    assert abs(fid_self) < 1e-6  # a set against itself
    fid.reset()  # forgets generated images, keeps the references
    fid.update(y, [""] * 6)
    other = fid.compute()["fid"]
    assert np.isfinite(other) and other > 1e-6
    # the ordering FID exists for: the reference set against itself scores better than against noise
    # (random Inception weights give no finer ordering: a slightly perturbed copy can score worse than noise)
    fid.reset()
    fid.update(torch.rand(6, 3, 48, 48, generator=gen), [""] * 6)
    noise = fid.compute()["fid"]
    assert 0 <= abs(fid_self) < 1e-6 < noise, (fid_self, noise)
    # CLIP score: the curate job's embedding and cosine, averaged
    clip = M.ClipScore.load("dd-tiny-clip", "random")
    assert isinstance(clip, M.Metric)
    captions = ["a red circle", "a blue square", "a cat", "a dog", "a tree", "a car"]
    clip.update(x[:4], captions[:4])
    clip.update(x[4:], captions[4:])
    want = clip_score(embed_images(clip.clip, M.to_pil(x)), embed_texts(clip.clip, captions)).mean()
    assert clip.compute()["clip_score"] == pytest.approx(float(want), abs=1e-6)
    # a Frechet distance in any feature space, accumulated batch by batch
    extractor = lambda images: images.mean(dim=(2, 3))  # noqa: E731
    fd = M.FeatureFrechetDistance(extractor, name="colour_fd")
    fd.update_reference(x[:3])
    fd.update_reference(x[3:])
    fd.update(y, captions)
    assert fd.compute()["colour_fd"] == pytest.approx(M.frechet_distance(extractor(x).double(), extractor(y).double()), rel=1e-9)


def test_clip_score_ranks_matching_captions_above_mismatched_ones_and_noise():
    """A planted CLIP (image embedding = mean colour, text embedding = the colour word) through ``ClipScore``:
    images score higher against their own captions than against shuffled captions or than noise images."""
    from types import SimpleNamespace

    words = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}
    unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
    model = SimpleNamespace(encode_image=lambda px, normalize=True: unit(px.mean(dim=(2, 3))),
                            encode_text=lambda tokens, normalize=True: unit(tokens))
    tokenizer = lambda texts: torch.tensor([next(words[w] for w in words if w in t) for t in texts])  # noqa: E731
    preprocess = lambda im: torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)  # noqa: E731
    clip = M.ClipScore(SimpleNamespace(model=model, tokenizer=tokenizer, preprocess=preprocess, device="cpu", embed_dim=3))
    gen = torch.Generator().manual_seed(0)
    colours = torch.eye(3)[[0, 1, 2, 0, 1, 2]].view(6, 3, 1, 1)
    images = (0.8 * colours + 0.2 * torch.rand(6, 3, 16, 16, generator=gen)).clamp(0, 1)
    captions = [f"a {c} square" for c in ("red", "green", "blue", "red", "green", "blue")]

    def score(imgs, caps):
        clip.reset()
        clip.update(imgs, caps)
        return clip.compute()["clip_score"]

    matched = score(images, captions)
    shuffled = score(images, captions[1:] + captions[:1])
    noise = score(torch.rand(6, 3, 16, 16, generator=gen), captions)
    assert matched > noise > shuffled, (matched, noise, shuffled)
    assert matched > 0.9 and abs(noise - 3**-0.5) < 0.05  # grey noise: cosine 1/sqrt(3) with any colour word


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A planted COCO annotation file with 4 captioned images and their (odd-sized) reference JPEGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("coco")
    (root / "val").mkdir()
    captions = ["a red circle on white", "a blue square on grey", "a red square on green", "a blue circle on black"]
    images, annotations = [], []
    for i, caption in enumerate(captions):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray((np.random.default_rng(i).random((96 + 8 * i, 128, 3)) * 255).astype(np.uint8)).save(root / "val" / name)
        images.append({"id": 100 + i, "file_name": name})
        annotations.append({"id": i, "image_id": 100 + i, "caption": caption})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    return root


def test_eval_runs_teacher_and_student_and_writes_metrics_report_and_grid(tmp_path_factory, tmp_path, coco, inception_weights):
    from PIL import Image

    from students.export import folder as export

    run_dir = student_run(tmp_path_factory)
    folder = export.export(run_dir, str(tmp_path / "student"))
    extra = M.FeatureFrechetDistance(lambda images: images.mean(dim=(2, 3)), name="colour_fd")
    cfg = E.EvalConfig(student=folder, captions=str(coco / "captions.json"), references=str(coco / "val"), num_images=4,
                       teacher_steps=(2, 1), clip_model="dd-tiny-clip", clip_weights="random",
                       inception_weights=inception_weights, fid_features=64, batch_size=4, grid_images=2,
                       latency_repeats=1, output=str(tmp_path / "eval"))
    payload = E.evaluate(cfg, extra_metrics=[extra], progress=False)
    assert set(payload["results"]) == {"teacher", "student"}
    assert set(payload["results"]["teacher"]) == {"2", "1"} and set(payload["results"]["student"]) == {"8"}  # its own steps
    for by_steps in payload["results"].values():
        for row in by_steps.values():
            for key in ("fid", "clip_score", "colour_fd", "latency_s", "unet_latency_s", "images_per_s"):
                assert np.isfinite(row[key]), (key, row)
            assert row["num_images"] == 4
    assert payload["protocol"]["num_references"] == 4 and payload["protocol"]["format"] == "coco"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"] == payload["results"]
    report = (tmp_path / "eval" / "report.html").read_text()
    from test_report_html import tiles

    assert re.findall(r'<figure class="plot"><img alt="([^"]+)"', report) == ["quality vs steps", "latency vs steps"]
    assert "<th>fid ↓</th>" in report and "<th>colour_fd ↓</th>" in report and '<a href="metrics.json">' in report
    assert "{" not in re.sub(r"<style>.*?</style>", "", report, flags=re.S)  # no JSON dump
    captions = (coco / "captions.txt").read_text().splitlines()[:2]
    shown = tiles(report)  # 3 rows (teacher 2 and 1 steps, student) of 2 images, each with its caption under it
    assert [c for c, _ in shown] == captions * 3 and len({im.size for _, im in shown}) == 1
    # grid.png: 3 rows of 2 images, the captions under the columns
    assert Image.open(tmp_path / "eval" / "grid.png").size == (110 + 2 * 128, 3 * 128 + 44)
    # the same student from its checkpoint, reference-free, from a plain captions file: the same images
    again = E.evaluate(E.EvalConfig(student=run_dir, captions=str(coco / "captions.txt"), num_images=4, teacher_steps=(),
                                    clip_model="dd-tiny-clip", clip_weights="random", batch_size=4, grid_images=0,
                                    latency_repeats=0, output=str(tmp_path / "eval2")), progress=False)
    row = again["results"]["student"]["8"]
    assert "fid" not in row and row["latency_s"] is None
    assert row["clip_score"] == pytest.approx(payload["results"]["student"]["8"]["clip_score"], abs=1e-5)


def test_eval_metrics_adherence_on_the_shapes_teacher_equals_the_python_extra_metric(tmp_path, capsys):
    """``--metrics adherence`` loads the committed analyser and scores what ``extra_metrics=[Adherence]``
    scores for the same captions, seeds and steps; another teacher, or a caption outside the shapes
    grammar, is one line before any work."""
    from teachers.shapes import world
    from teachers.shapes.analyser import Adherence, load_analyser

    world.write_captions(str(tmp_path / "c.txt"), 4, seed=5)
    common = dict(captions=str(tmp_path / "c.txt"), teacher="shapes", teacher_steps=(2,), num_images=4, batch_size=4,
                  grid_images=0, latency_repeats=0)
    argv = ["--captions", common["captions"], "--teacher", "shapes", "--teacher_steps", "2", "--num_images", "4",
            "--batch_size", "4", "--grid_images", "0", "--latency_repeats", "0"]
    assert E.main(argv + ["--metrics", "adherence", "--output", str(tmp_path / "cli")]) == 0
    row = json.loads((tmp_path / "cli" / "metrics.json").read_text())["results"]["teacher"]["2"]
    assert 0.0 <= row["adherence"] <= 1.0 and 0.0 <= row["exact"] <= row["adherence"]
    ref = E.evaluate(E.EvalConfig(**common, metrics=(), output=str(tmp_path / "py")), extra_metrics=[Adherence(load_analyser())],
                     progress=False)["results"]["teacher"]["2"]
    assert {k: row[k] for k in ref if k.startswith(("acc_", "adherence", "exact"))} == \
        {k: v for k, v in ref.items() if k.startswith(("acc_", "adherence", "exact"))}
    capsys.readouterr()
    bad = argv + ["--output", str(tmp_path / "bad")]
    assert E.main([a if a != "shapes" else "tiny" for a in bad] + ["--metrics", "adherence"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "distill eval: error: --metrics adherence reads images of the shapes world with its analyser: it needs the shapes "
        "teacher (or a student of it), not teacher 'tiny'"]
    (tmp_path / "cat.txt").write_text("a photo of a cat\n" * 4)
    assert E.main([a if a != common["captions"] else str(tmp_path / "cat.txt") for a in bad] + ["--metrics", "frechet_analyser"]) == 2
    assert "not in the shapes world's grammar, first 'a photo of a cat'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_fail_before_any_work(tmp_path, coco, inception_weights, capsys):
    base = ["--teacher", "tiny", "--teacher_steps", "2", "--num_images", "2", "--output", str(tmp_path / "out")]

    def fails(argv, *needles):
        assert E.main(base + argv) == 2
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err

    fails(["--captions", str(tmp_path / "missing.json")], "captions file", "not found")
    (tmp_path / "wrong.json").write_text(json.dumps({"annotations": [{"caption": "x"}]}))
    fails(["--captions", str(tmp_path / "wrong.json")], "not a COCO captions annotation file")
    captions = ["--captions", str(coco / "captions.json")]
    fails(captions + ["--references", str(coco / "val")], "FID needs --inception_weights")
    fails(captions + ["--references", str(coco / "val"), "--inception_weights", str(tmp_path / "nope.pth")], "nope.pth", "not found")
    fails(captions + ["--metrics", "fid", "--inception_weights", inception_weights], "needs --references")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(captions + ["--references", str(empty), "--inception_weights", inception_weights], "2 of 2 reference images missing")
    fails(captions + ["--metrics", "clip"], "--clip_weights")
    fails(captions + ["--metrics", "clip,aesthetics", "--clip_weights", "random"], "unknown metric(s) ['aesthetics']")
    fails(["--captions", str(coco / "captions.txt"), "--num_images", "9"], "fewer than --num_images 9")
    fails(captions + ["--teacher", "no-such-teacher"], "unknown teacher 'no-such-teacher'")
    fails(captions + ["--student", str(tmp_path)], "neither a checkpoint folder")
    assert not (tmp_path / "out").exists()
