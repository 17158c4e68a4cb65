"""The teacher-feature discriminator and the adversarial losses: only the heads train, gradients
reach the generator through the frozen backbone, the losses have their closed-form values."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from students.distill import losses as distill
from students.models.discriminator import TeacherFeatureDiscriminator
from teachers import configs

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)


@pytest.fixture(scope="module")
def teacher_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**configs.tiny_unet()).eval()


def test_only_heads_train_and_generator_gets_gradients(teacher_unet):
    disc = TeacherFeatureDiscriminator(teacher_unet, layers=("down_blocks.1", "mid_block"))
    before = {k: v.clone() for k, v in teacher_unet.state_dict().items()}
    trainable = [p for p in disc.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in teacher_unet.parameters())
    opt = torch.optim.SGD(trainable, lr=0.1)
    generator = torch.nn.Parameter(torch.randn(2, 4, 16, 16))
    t, ctx = torch.tensor([100.0, 700.0]), torch.randn(2, 77, 32)
    real = torch.randn(2, 4, 16, 16)
    d_loss = distill.hinge_discriminator_loss(disc(real, t, ctx), disc(generator.detach(), t, ctx))
    opt.zero_grad()
    d_loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in teacher_unet.state_dict().items())  # backbone unchanged
    g_loss = distill.hinge_generator_loss(disc(generator, t, ctx))
    g_loss.backward()
    assert generator.grad is not None and generator.grad.abs().sum() > 0  # through the frozen backbone


def test_backbone_stops_at_the_deepest_layer_and_features_match_a_full_forward(teacher_unet):
    disc = TeacherFeatureDiscriminator(teacher_unet, layers=("down_blocks.0",))
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    seen = []
    h = teacher_unet.up_blocks[0].register_forward_hook(lambda *a: seen.append(1) and None)
    with torch.no_grad():
        feats = disc.features(x, t, ctx)
    h.remove()
    assert seen == []  # the up path never ran
    captured = {}
    def keep(module, inputs, output):
        captured["f"] = output[0]

    h = teacher_unet.down_blocks[0].register_forward_hook(keep)
    with torch.no_grad():
        teacher_unet(x, t, ctx)
    h.remove()
    torch.testing.assert_close(feats["down_blocks.0"], captured["f"])


def test_logits_depend_on_the_text_condition(teacher_unet):
    torch.manual_seed(3)
    disc = TeacherFeatureDiscriminator(teacher_unet, layers=("mid_block",))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    with torch.no_grad():
        a = disc(x, t, torch.randn(1, 77, 32))[0]
        b = disc(x, t, torch.randn(1, 77, 32))[0]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="up path"):
        TeacherFeatureDiscriminator(teacher_unet, layers=("up_blocks.0",))


def test_losses_closed_form():
    real, fake = [torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.0])]
    # hinge: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; relu(1-2)=0, relu(1+0)=1 -> 0.5
    assert distill.hinge_discriminator_loss(real, fake).item() == pytest.approx(0.75)
    assert distill.hinge_generator_loss(fake).item() == pytest.approx(1.0)
    sp = torch.nn.functional.softplus
    want = (sp(-real[0]).mean() + sp(fake[0]).mean()).item()
    assert distill.nonsaturating_discriminator_loss(real, fake).item() == pytest.approx(want)
    assert distill.nonsaturating_generator_loss(fake).item() == pytest.approx(sp(-fake[0]).mean().item())
    x = torch.randn(3, 4, requires_grad=True)
    logits = [(x * 2.0).sum(dim=1)]  # grad = 2 everywhere: ||grad||^2 = 4 * 4 = 16 per sample
    assert distill.r1_penalty(logits, x).item() == pytest.approx(8.0)


def test_posterior_sample_matches_the_ddpm_posterior_in_float64():
    """Against DDPM's beta form: abar_t = abar_s * (1 - beta) for one step from s to t."""
    torch.manual_seed(0)
    abar_s, beta = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.02], dtype=torch.float64)
    abar_t = abar_s * (1 - beta)
    x0, z_t = torch.randn(1, 4, 2, 2, dtype=torch.float64), torch.randn(1, 4, 2, 2, dtype=torch.float64)
    zero = torch.zeros_like(x0)
    got = distill.posterior_sample(x0, z_t, zero, abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt())
    # DDPM eq. 7: mu = sqrt(abar_s) beta / (1 - abar_t) x0 + sqrt(1 - beta) (1 - abar_s) / (1 - abar_t) z_t
    want = abar_s.sqrt() * beta / (1 - abar_t) * x0 + (1 - beta).sqrt() * (1 - abar_s) / (1 - abar_t) * z_t
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
