"""``compute_losses`` per recipe against expectations built by hand from the definitions (float64).

The student is a fixed linear map whose outputs are known in closed form, so each term can be written
out here without calling ``compute_losses``: the recipe weights, the guidance-aware (CFG) branch and its
random draws, SnapFusion's dynamic gamma, SnapGen's timestep-aware scaling, the step-distillation target
at the noise levels the batch carries, and BK-SDM's feature sum.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from students.distill import losses as D
from students.distill.recipes import compute_losses, get_recipe

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)

B = 3
LAYERS = ("mid_block", "up_blocks.0")


class LinearStudent(torch.nn.Module):
    """pred = a z + c mean(cond) + t / 1000; features: fixed slices of z (2 and 3 channels)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, z, t, encoder_hidden_states=None, added_cond_kwargs=None, return_features=False):
        pred = predict(self.a, self.c, z, t, encoder_hidden_states)
        feats = {"mid_block": z[:, :2] * self.a, "up_blocks.0": z[:, 1:] * self.c} if return_features else None
        return SimpleNamespace(sample=pred, features=feats)


def predict(a, c, z, t, cond):
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
    return a * z + c * cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + t / 1000


def schedule():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def make_batch():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    abar = schedule()
    t = torch.tensor([900.0, 500.0, 100.0], dtype=torch.float64)
    alpha, sigma = abar[t.long()].sqrt(), (1 - abar[t.long()]).sqrt()
    t_next = torch.tensor([700.0, 300.0, 0.0])
    batch = {"keys": ["a", "b", "c"], "z": r(B, 4, 2, 2), "t": t, "alpha": alpha, "sigma": sigma, "cond": r(B, 5, 4),
             "uncond": r(B, 5, 4), "x0": r(B, 4, 2, 2), "guidance": torch.tensor([7.5, 3.0, 1.0], dtype=torch.float64),
             "z_next": r(B, 4, 2, 2), "alpha_next": abar[t_next.long()].sqrt(), "sigma_next": (1 - abar[t_next.long()]).sqrt()}
    targets = {"pred_cond": r(B, 4, 2, 2), "pred_uncond": r(B, 4, 2, 2),
               "feats": {"mid_block": r(B, 2, 2, 2), "up_blocks.0": r(B, 3, 2, 2)}}
    task_point = {"noise": r(B, 4, 2, 2), "t": torch.tensor([10, 400, 999])}
    return batch, targets, task_point


def mse(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)


def hand_terms(student, batch, targets, task_point, *, guided_w=None, use_guided=None):
    """Raw per-sample terms from the definitions: output (plain or guided), features, step, task."""
    a, c = student.a.detach(), student.c.detach()
    z, t = batch["z"], batch["t"]
    pc, pu = predict(a, c, z, t, batch["cond"]), predict(a, c, z, t, batch["uncond"])
    out = mse(pc, targets["pred_cond"])
    if guided_w is not None:
        w = guided_w.view(-1, 1, 1, 1)
        guided = mse(pu + w * (pc - pu), targets["pred_uncond"] + w * (targets["pred_cond"] - targets["pred_uncond"]))
        out = torch.where(use_guided, guided, out)
    feats = mse(z[:, :2] * a, targets["feats"]["mid_block"]) + mse(z[:, 1:] * c, targets["feats"]["up_blocks.0"])
    # step: one DDIM step from z (alpha, sigma) to z_next (alpha_next, sigma_next), SnapFusion eq. 5-6
    al, si, an, sn = (batch[k].view(-1, 1, 1, 1) for k in ("alpha", "sigma", "alpha_next", "sigma_next"))
    w = batch["guidance"].view(-1, 1, 1, 1)
    eps = pu + w * (pc - pu)
    x_student = (z - si * eps) / al
    x_target = (batch["z_next"] - (sn / si) * z) / (an - (sn / si) * al)
    step = torch.clamp(batch["alpha"] ** 2 / batch["sigma"] ** 2, min=1.0) * mse(x_student, x_target)
    # task: fresh noise at the training timesteps t_task, epsilon target
    abar = schedule()[task_point["t"]]
    at, st = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    z_task = at * batch["x0"] + st * task_point["noise"]
    task = mse(predict(a, c, z_task, task_point["t"].double(), batch["cond"]), task_point["noise"])
    return {"output": out, "feature": feats, "step": step, "task": task}


def run(recipe, batch, targets, task_point, seed=1):
    heads = torch.nn.ModuleDict({k.replace(".", "_"): torch.nn.Identity() for k in LAYERS})
    torch.manual_seed(0)
    student = LinearStudent()
    got = compute_losses(student, heads, batch, targets, recipe, schedule(), torch.Generator().manual_seed(seed), task_point)
    return student, {k: float(v.detach()) for k, v in got.items()}


# ``per_sample_mse`` computes in float32: each input rounds to 2^-24 relative, the squared differences and a
# mean of 16 add a few ulps, and the ratios (timestep-aware scaling, gamma) a few more: 1e-5 relative is
# a wide margin for that, and far below what a wrong weight or a wrong branch changes (10% or more).
REL = 1e-5


def check(got, want):
    assert set(got) == set(want) | {"loss"}
    for k, v in want.items():
        assert got[k] == pytest.approx(float(v.mean()), rel=REL), k
    assert got["loss"] == pytest.approx(sum(float(v.mean()) for v in want.values()), rel=REL)


def test_output_kd_weights_output_1_and_task_0_1():
    batch, targets, tp = make_batch()
    student, got = run(get_recipe("output_kd"), batch, targets, tp)
    h = hand_terms(student, batch, targets, tp)
    check(got, {"output": h["output"], "task": 0.1 * h["task"]})


def test_bk_sdm_sums_every_feature_level_with_weight_1():
    batch, targets, tp = make_batch()
    recipe = dataclasses.replace(get_recipe("bk_sdm"), feature_weights=tuple((l, 1.0) for l in LAYERS))
    student, got = run(recipe, batch, targets, tp)
    h = hand_terms(student, batch, targets, tp)
    check(got, {"output": h["output"], "feature": h["feature"], "task": h["task"]})


def test_snapgen_timestep_aware_scaling_brings_each_term_to_the_task_loss():
    batch, targets, tp = make_batch()
    student, got = run(get_recipe("snapgen_kd", feature_weights=tuple((l, 1.0) for l in LAYERS)), batch, targets, tp)
    h = hand_terms(student, batch, targets, tp)
    # per sample: output * (task / output) = task, likewise the feature term
    check(got, {"output": h["task"], "feature": h["task"], "task": h["task"]})
    assert got["output"] != pytest.approx(float(h["output"].mean()))  # the scaling did something


def test_snapfusion_guidance_branch_step_term_and_dynamic_gamma():
    batch, targets, tp = make_batch()
    recipe = get_recipe("snapfusion_step", guidance_prob=0.5)
    g = torch.Generator().manual_seed(1)  # the draws compute_losses makes, in its order
    use = torch.rand(B, generator=g) < 0.5
    lo, hi = recipe.guidance_range
    w = lo + (hi - lo) * torch.rand(B, generator=g)
    assert use.any() and not use.all()  # both branches present with this seed
    student, got = run(recipe, batch, targets, tp, seed=1)
    h = hand_terms(student, batch, targets, tp, guided_w=w.double(), use_guided=use)
    distill = h["output"] + h["step"]
    gamma = 0.2 * distill.mean() / h["task"].mean()  # SnapFusion: gamma L_dstl / L_task
    check(got, {"output": h["output"], "step": h["step"], "task": gamma * h["task"]})


def test_decoder_term_is_inside_compute_losses():
    batch, targets, tp = make_batch()
    batch["image"] = torch.randn(B, 3, 4, 4, dtype=torch.float64)

    class Decoder(torch.nn.Module):
        config = SimpleNamespace(scaling_factor=2.0)

        def decode(self, latents):
            return SimpleNamespace(sample=latents[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2))

    heads = torch.nn.ModuleDict()
    student = LinearStudent()
    got = compute_losses(student, heads, batch, targets, get_recipe("output_kd"), schedule(), torch.Generator().manual_seed(1),
                         tp, decoder=Decoder(), decoder_weight=0.5)
    image = (batch["x0"] / 2.0)[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert float(got["decoder"]) == pytest.approx(float(0.5 * mse(image, batch["image"]).mean()), rel=REL)
    assert float(got["loss"].detach()) == pytest.approx(float((got["output"] + got["task"] + got["decoder"]).detach()), rel=REL)
