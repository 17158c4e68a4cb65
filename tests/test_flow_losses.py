"""The flow-matching losses against hand-computed float64 values and the definitions' invariants."""

import math

import pytest
import torch

from students.distill import losses as D

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)


def test_logit_normal_density_is_sd3s_formula_and_integrates_to_one():
    # Hand-computed (m = 0, s = 1): at t = 1/2, logit 0: 1 / (sqrt(2 pi) * 1/4) = 4 / sqrt(2 pi);
    # at t = sigmoid(1), logit 1: exp(-1/2) / (sqrt(2 pi) t (1 - t)).
    t1 = 1 / (1 + math.exp(-1))
    t = torch.tensor([0.5, t1], dtype=torch.float64)
    want = [4 / math.sqrt(2 * math.pi), math.exp(-0.5) / (math.sqrt(2 * math.pi) * t1 * (1 - t1))]
    assert D.logit_normal_density(t).tolist() == pytest.approx(want, rel=1e-14)
    # m = 0.5, s = 2 at t = 1/2: exp(-(0 - 0.5)^2 / 8) / (2 sqrt(2 pi) / 4)
    got = D.logit_normal_density(torch.tensor([0.5], dtype=torch.float64), m=0.5, s=2.0).item()
    assert got == pytest.approx(math.exp(-0.25 / 8) * 4 / (2 * math.sqrt(2 * math.pi)), rel=1e-14)
    # a density on (0, 1): the integral over logit space (t = sigmoid(u), dt = t (1 - t) du) is 1
    u = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    tt = torch.sigmoid(u)
    integral = torch.trapezoid(D.logit_normal_density(tt) * tt * (1 - tt), u).item()
    assert integral == pytest.approx(1.0, abs=1e-9)  # the normal's mass beyond 12 sigma is < 1e-32


def test_logit_normal_timesteps_are_the_sigmoid_of_the_generators_normals():
    g = torch.Generator().manual_seed(3)
    t = D.logit_normal_timesteps(5, m=0.5, s=2.0, generator=g, dtype=torch.float64)
    u = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(t, 1 / (1 + torch.exp(-(0.5 + 2.0 * u))), rtol=1e-15, atol=0)
    # distribution check, m = 0, s = 1: P(t < q) = Phi(logit q); with N draws the empirical
    # fraction has standard deviation sqrt(p (1 - p) / N) <= 0.5 / sqrt(N) = 0.0011 at N = 2e5: 6 of them.
    n = 200_000
    draws = D.logit_normal_timesteps(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert 0 < draws.min() and draws.max() < 1
    for q in (0.1, 0.3, 0.5, 0.9):
        phi = 0.5 * (1 + math.erf(math.log(q / (1 - q)) / math.sqrt(2)))
        assert abs((draws < q).double().mean().item() - phi) < 6 * 0.5 / math.sqrt(n), q


def test_flow_shift_is_the_schedulers_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    # the scheduler shifts linspace(shifted max, shifted min) once more, in float32
    base = torch.linspace(1.0, float(D.flow_shift(torch.tensor(1e-3, dtype=torch.float64), 3.0)), 5, dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas[:-1].double(), D.flow_shift(base, 3.0), rtol=0, atol=1e-6)
    assert D.flow_shift(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 3.0).tolist() == [0.0, 0.75, 1.0]


def test_flow_matching_loss_and_the_velocity_conversions():
    x0 = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]], dtype=torch.float64)  # (2, 1, 1, 2)
    eps = torch.tensor([[[[0.5, -1.0]]], [[[2.0, 2.0]]]], dtype=torch.float64)
    sigma = torch.tensor([0.25, 0.9], dtype=torch.float64)
    z = D.flow_interpolate(x0, eps, sigma)
    # hand-computed: 0.75 * (1, 2) + 0.25 * (0.5, -1) = (0.875, 1.25); 0.1 * (0, -1) + 0.9 * (2, 2) = (1.8, 1.7)
    assert z.flatten().tolist() == pytest.approx([0.875, 1.25, 1.8, 1.7], abs=1e-15)
    v = D.flow_velocity_target(x0, eps)
    assert v.flatten().tolist() == [-0.5, -3.0, 2.0, 3.0]
    # the exact velocity recovers both ends of the path
    torch.testing.assert_close(D.flow_pred_to_x0(v, z, sigma), x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(D.flow_pred_to_noise(v, z, sigma), eps, rtol=0, atol=1e-15)
    # a zero prediction: mean of the squared target per sample, (0.25 + 9) / 2 and (4 + 9) / 2
    zero = torch.zeros_like(x0)
    assert D.flow_matching_loss(zero, x0, eps).tolist() == pytest.approx([4.625, 6.5], rel=1e-15)
    assert D.flow_matching_loss(v, x0, eps).tolist() == [0.0, 0.0]
    assert D.velocity_distill_loss(v + 1.0, v).tolist() == pytest.approx([1.0, 1.0], rel=1e-15)
    # the velocity is the path's derivative: a finite difference in sigma gives it (the path is linear)
    h = 1e-3
    torch.testing.assert_close((D.flow_interpolate(x0, eps, sigma + h) - z) / h, v, rtol=0, atol=1e-12)
