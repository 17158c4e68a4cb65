"""Each distillation loss against a hand-computed float64 value or a planted answer."""

import math

import pytest
import torch

from students.distill import losses as D

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)

torch.manual_seed(0)
B = 3


def t64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def schedule():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD scaled_linear
    return torch.cumprod(1 - betas, 0)


def test_alpha_sigma_and_targets_match_the_definitions():
    abar = schedule()
    t = torch.tensor([0, 499, 999])
    a, s = D.alpha_sigma(abar, t)
    assert torch.allclose(a**2 + s**2, torch.ones(3, dtype=torch.float64))
    assert math.isclose(a[1].item(), abar[499].sqrt().item())
    x0, eps = t64(B, 4, 2, 2), t64(B, 4, 2, 2)
    v = D.denoising_target(x0, eps, a, s, "v_prediction")
    assert torch.allclose(v[2], a[2] * eps[2] - s[2] * x0[2])
    z = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    # x0 recovered exactly from either parameterisation (the inverse the step loss relies on)
    assert torch.allclose(D.pred_to_x0(eps, z, a, s, "epsilon"), x0)
    assert torch.allclose(D.pred_to_x0(v, z, a, s, "v_prediction"), x0)
    with pytest.raises(ValueError, match="'sample'"):
        D.denoising_target(x0, eps, a, s, "sample")


def test_task_and_output_losses_are_per_sample_mse():
    pred, x0, eps = t64(B, 4, 2, 2), t64(B, 4, 2, 2), t64(B, 4, 2, 2)
    a, s = D.alpha_sigma(schedule(), torch.tensor([10, 500, 900]))
    expected = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(D.task_loss(pred, x0, eps, a, s, "epsilon").double(), expected)
    hand = sum((pred[1].flatten()[k] - eps[1].flatten()[k]).item() ** 2 for k in range(16)) / 16
    assert math.isclose(D.task_loss(pred, x0, eps, a, s, "epsilon")[1].item(), hand, rel_tol=1e-6)
    teacher = t64(B, 4, 2, 2)
    assert torch.allclose(D.output_distill_loss(pred, teacher).double(), ((pred - teacher) ** 2).mean(dim=(1, 2, 3)))


def test_feature_loss_with_known_projections_and_resize():
    conv = torch.nn.Conv2d(2, 3, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]).view(3, 2, 1, 1))
    proj = torch.nn.ModuleDict({"mid_block": conv, "up_blocks_0": torch.nn.Identity()})
    s_mid, t_mid = t64(B, 2, 2, 2), t64(B, 3, 2, 2)
    s_up, t_up = t64(B, 3, 2, 2), t64(B, 3, 4, 4)  # student map at half the teacher's resolution
    got = D.feature_distill_loss({"mid_block": s_mid, "up_blocks.0": s_up}, {"mid_block": t_mid, "up_blocks.0": t_up},
                                 proj, {"mid_block": 0.5, "up_blocks.0": 2.0})
    projected = torch.stack([s_mid[:, 0], 2 * s_mid[:, 1], s_mid[:, 0] + s_mid[:, 1]], 1)
    up = torch.nn.functional.interpolate(s_up, size=(4, 4), mode="bilinear", align_corners=False)
    expected = 0.5 * ((projected - t_mid) ** 2).mean((1, 2, 3)) + 2.0 * ((up - t_up) ** 2).mean((1, 2, 3))
    assert torch.allclose(got.double(), expected)


def test_timestep_aware_scale_matches_task_value_and_keeps_distill_gradient():
    distill = torch.tensor([4.0, 0.01, 100.0], dtype=torch.float64, requires_grad=True)
    task = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    scaled = D.timestep_aware_scale(distill, task)
    assert torch.allclose(scaled, task)
    scaled.sum().backward()
    assert torch.allclose(distill.grad, task / distill.detach(), rtol=1e-6)


def test_guided_loss_reduces_to_plain_output_loss_at_w_1_and_matches_formula():
    sc, su, tc, tu = (t64(B, 4, 2, 2) for _ in range(4))
    ones = torch.ones(B, dtype=torch.float64)
    assert torch.allclose(D.guided_distill_loss(sc, su, tc, tu, ones), D.output_distill_loss(sc, tc))
    w = torch.tensor([2.0, 7.5, 14.0], dtype=torch.float64)
    guided = lambda c, u: w.view(-1, 1, 1, 1) * c - (w.view(-1, 1, 1, 1) - 1) * u  # noqa: E731
    expected = ((guided(sc, su) - guided(tc, tu)) ** 2).mean((1, 2, 3))
    assert torch.allclose(D.guided_distill_loss(sc, su, tc, tu, w).double(), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_target_is_the_planted_x0_of_a_ddim_trajectory(prediction_type):
    abar = schedule()
    x0, eps = t64(B, 4, 2, 2), t64(B, 4, 2, 2)
    t, s = torch.tensor([999, 700, 300]), torch.tensor([500, 100, 0])
    at, st = D.alpha_sigma(abar, t)
    as_, ss = D.alpha_sigma(abar, s)
    bc = lambda x: x.view(-1, 1, 1, 1)  # noqa: E731
    z_t, z_s = bc(at) * x0 + bc(st) * eps, bc(as_) * x0 + bc(ss) * eps  # deterministic DDIM with the true eps
    assert torch.allclose(D.step_distill_target(z_t, z_s, at, st, as_, ss), x0, atol=1e-9)
    perfect = eps if prediction_type == "epsilon" else bc(at) * eps - bc(st) * x0
    assert torch.allclose(D.step_distill_loss(perfect, z_t, z_s, at, st, as_, ss, prediction_type).double(),
                          torch.zeros(B, dtype=torch.float64), atol=1e-12)
    wrong = perfect + 0.1
    x_hat = D.pred_to_x0(wrong, z_t, at, st, prediction_type)
    weight = torch.clamp(at**2 / st**2, min=1.0)
    expected = weight * ((x_hat - x0) ** 2).mean((1, 2, 3))
    assert torch.allclose(D.step_distill_loss(wrong, z_t, z_s, at, st, as_, ss, prediction_type).double(), expected, rtol=1e-6)
    assert weight[0] == 1.0 and weight[2] > 1.0  # max(alpha^2/sigma^2, 1): only low-noise steps are up-weighted


def test_dynamic_gamma_and_decoder_loss():
    distill, task = torch.tensor([2.0, 4.0]), torch.tensor([10.0, 30.0])
    assert math.isclose(D.dynamic_gamma(distill, task, 0.2).item(), 0.2 * 3.0 / 20.0, rel_tol=1e-6)
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(D.decoder_distill_loss(a, b), torch.full((2,), 0.25))


def test_robust_skip_makes_chosen_blocks_identity_and_removes_hooks():
    from students.models.blocks import ResnetBlock, Transformer2D
    from students.distill.recipes import robust_skip
    from students.models.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        full = unet(x, t, c).sample
        seen = {}
        with robust_skip(unet, 1.0, torch.Generator().manual_seed(0)) as rs:
            assert rs.handles
            # observers registered after the skip hooks run after them: they see the final output
            hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0], o))) for m in unet.modules()
                     if isinstance(m, (Transformer2D, ResnetBlock))]
            skipped = unet(x, t, c).sample
            for h in hooks:
                h.remove()
        for m, (inp, out) in seen.items():
            if isinstance(m, Transformer2D) or m.conv_shortcut is None:
                assert out is inp  # p = 1: every skippable block returned its input
        assert not torch.allclose(full, skipped)
        assert all(not m._forward_hooks for m in unet.modules())
        assert torch.equal(unet(x, t, c).sample, full)  # hooks gone: the model is whole again
