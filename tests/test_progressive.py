"""Progressive distillation: the round's target is two DDIM steps of its teacher (planted, float64),
the rounds halve the steps, and a two-round run trains end to end."""

import json

import pytest
import torch

from core.errors import UserError
from students.distill import losses as D
from students.distill.progressive import rounds

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)


def test_progressive_target_is_two_ddim_steps_of_a_planted_linear_teacher():
    # A linear teacher x(z, t) = c(t) z: two DDIM steps are z'' = m2 m1 z with
    # m1 = a' c + (s'/s)(1 - a c) at t, m2 = a'' c' + (s''/s')(1 - a' c') at t' (Salimans & Ho, Alg. 2).
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    t, t_mid = torch.tensor([900.0, 500.0, 300.0], dtype=torch.float64), torch.tensor([700.0, 350.0, 200.0], dtype=torch.float64)
    abar = lambda tt: torch.cos(tt / 1000 * torch.pi / 2) ** 2 * 0.999 + 0.0005  # noqa: E731
    a, s = abar(t).sqrt(), (1 - abar(t)).sqrt()
    a1, s1 = abar(t_mid).sqrt(), (1 - abar(t_mid)).sqrt()
    t_end = t_mid - 150
    a2, s2 = abar(t_end).sqrt(), (1 - abar(t_end)).sqrt()
    c = lambda tt: 0.3 + tt / 2000  # noqa: E731
    calls = []

    def teacher_x0(zz, tt, alpha, sigma):
        calls.append(tt)
        return c(tt).reshape(-1, 1, 1, 1) * zz

    b = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    m1 = a1 * c(t) + s1 / s * (1 - a * c(t))
    m2 = a2 * c(t_mid) + s2 / s1 * (1 - a1 * c(t_mid))
    z_end = b(m1 * m2) * z
    got_end = D.two_step_landing(teacher_x0, z, t, a, s, t_mid, a1, s1, a2, s2)
    assert torch.allclose(got_end, z_end, rtol=1e-12, atol=1e-14)
    assert [tt.tolist() for tt in calls] == [t.tolist(), t_mid.tolist()]  # the teacher at t, then at t'
    x_target = D.progressive_target(teacher_x0, z, t, a, s, t_mid, a1, s1, a2, s2)
    expected = (z_end - b(s2 / s) * z) / b(a2 - s2 / s * a)
    assert torch.allclose(x_target, expected, rtol=1e-12, atol=1e-14)
    # one student DDIM step t -> t'' with x~ lands where the teacher's two steps land
    assert torch.allclose(D.ddim_step(x_target, z, a, s, a2, s2), z_end, rtol=1e-12, atol=1e-14)


def test_rounds_halve_down_to_the_student_steps():
    assert rounds(40, 10) == [20, 10] and rounds(16, 8) == [8] and rounds(8, 1) == [4, 2, 1]
    for bad in ((40, 8), (8, 8), (12, 8)):
        with pytest.raises(UserError, match="does not halve"):
            rounds(*bad)


@pytest.fixture(scope="module")
def eight_step_dump(tmp_path_factory):
    from conftest import run_dump

    captions = [f"a {c} circle on a white background" for c in ("red", "blue", "green", "grey")]
    return run_dump(tmp_path_factory.mktemp("dump"), captions, num_inference_steps=8, batch_size=4, feature_layers=None,
                    cpu_threads=1)


def test_two_rounds_run_end_to_end(eight_step_dump, tmp_path):
    from students.training.train import TrainConfig
    from students.training.cli import main

    torch.set_num_threads(1)
    out = tmp_path / "prog"
    argv = ["--data", eight_step_dump, "--output", str(out), "--recipe", "progressive", "--progressive_from", "8",
            "--student_steps", "2", "--max_steps", "2", "--batch_size", "2", "--warmup_steps", "1", "--ema_decay", "0"]
    assert main(argv) == 0
    for n in (4, 2):
        rows = [json.loads(line) for line in (out / f"round-{n:02d}" / "losses.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == pytest.approx(r["loss/step"]) for r in rows)
        config = json.loads((out / f"round-{n:02d}" / "checkpoints" / "step-0000002" / "config.json").read_text())
        assert config["recipe"]["student_steps"] == n and config["recipe"]["two_step_teacher"]
    with pytest.raises(UserError, match="needs --recipe progressive"):
        TrainConfig(data=eight_step_dump, output=str(out), progressive_from=8, student_steps=2)
