"""The shapes experiment kit the demo and the benchmarks share: every evaluation row at the guidance it
is given (teacher-only rows too), and a result cache that refuses a row made with other settings."""

import json
import os

import pytest

from diffusion_distill import kit


@pytest.fixture
def planted(monkeypatch, tmp_path):
    """``evaluate`` replaced by a recorder that writes a metrics.json as the real one does."""
    from students.evaluation import evaluate as E
    from teachers.shapes import analyser as A

    seen = []

    def fake_evaluate(cfg, extra_metrics=(), progress=True):
        seen.append(cfg)
        results = {"teacher": {str(s): {"adherence": 0.5} for s in cfg.teacher_steps},
                   "student": {str(s): {"adherence": 0.25} for s in cfg.student_steps}}
        os.makedirs(cfg.output, exist_ok=True)
        with open(os.path.join(cfg.output, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump({"results": results}, f)
        return {"results": results}

    monkeypatch.setattr(E, "evaluate", fake_evaluate)
    monkeypatch.setattr(A, "Adherence", lambda analyser: "adherence")
    monkeypatch.setattr(A, "AnalyserFrechet", lambda analyser: "frechet")
    captions = tmp_path / "captions.txt"
    captions.write_text("a small red circle at the top left on a grey background\n")
    student = tmp_path / "student"
    student.mkdir()
    (student / "inference.json").write_text("{}")  # an exported folder
    return seen, str(captions), str(student)


def test_teacher_only_and_student_rows_receive_the_same_guidance(planted, tmp_path):
    seen, captions, student = planted
    guidance = 4.25  # planted: neither diffusers' 7.5 nor the shapes teacher's 6.0
    kit.evaluate_row(str(tmp_path / "t"), captions=captions, num_images=1, guidance_scale=guidance,
                     teacher_steps=(50, 4), analyser=object())
    kit.evaluate_row(str(tmp_path / "s"), captions=captions, num_images=1, guidance_scale=guidance, student=student,
                     student_steps=(4,), analyser=object())
    assert [cfg.guidance_scale for cfg in seen] == [guidance, guidance]
    assert seen[0].student is None and seen[0].teacher_steps == (50, 4) and seen[1].student_steps == (4,)


def test_the_result_cache_reuses_equal_settings_and_refuses_other_ones(planted, tmp_path):
    seen, captions, student = planted
    row = dict(captions=captions, num_images=1, guidance_scale=6.0, student=student, student_steps=(4,),
               analyser=object())
    out = str(tmp_path / "row")
    first = kit.evaluate_row(out, **row)
    assert kit.evaluate_row(out, **row) == first and len(seen) == 1  # equal settings: the cached row
    for change, field in ((dict(num_images=2), "num_images"), (dict(guidance_scale=7.5), "guidance_scale"),
                          (dict(student_steps=(2,)), "student_steps")):
        with pytest.raises(kit.StaleRow, match=field):
            kit.evaluate_row(out, **dict(row, **change))
    with open(captions, "a", encoding="utf-8") as f:  # other captions under the same file name
        f.write("a large blue square at the centre on a white background\n")
    with pytest.raises(kit.StaleRow, match="captions_sha256"):
        kit.evaluate_row(out, **row)
    os.remove(os.path.join(out, kit.SETTINGS))  # a row from before settings were recorded: refused too
    with pytest.raises(kit.StaleRow):
        kit.evaluate_row(out, **row)
    assert len(seen) == 1
