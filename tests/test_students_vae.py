"""Student decoders: parameter counts against the papers, the VAE decode contract, use as ``pipe.vae``."""

import pytest
import torch

from students.models import vae as V

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)


def _meta(name, **kw):
    with torch.device("meta"):
        return V.build_vae(name, **kw)


@pytest.mark.parametrize("name,paper", [("pruned", 13e6), ("tiny", 1.22e6)])  # SnapFusion Sec. 3.3; TAESD
def test_decoder_parameters_within_5_percent_of_paper(name, paper):
    count = V.decoder_parameters(_meta(name))
    assert abs(count / paper - 1) <= 0.05, f"{name}: {count / 1e6:.2f}M vs {paper / 1e6:.2f}M"


def test_pruned_is_a_uniform_channel_ratio_of_the_sd_decoder():
    from diffusers import AutoencoderKL

    from teachers.configs import sd_vae

    assert V.pruned()["block_out_channels"] == (64, 128, 256, 256)
    assert V.pruned(0.25)["block_out_channels"] == (32, 64, 128, 128)
    with torch.device("meta"):
        full = V.decoder_parameters(AutoencoderKL(**sd_vae()))
    assert full == 49_490_199
    assert 0.24 < V.decoder_parameters(_meta("pruned")) / full < 0.26  # width x 0.5 -> conv weights x 0.25
    with pytest.raises(ValueError, match="channel_ratio=1.5"):
        V.pruned(1.5)
    with pytest.raises(ValueError, match="unknown VAE preset 'big'"):
        V.build_vae("big")


def test_tiny_is_diffusers_autoencoder_tiny_with_taesd_defaults():
    from diffusers import AutoencoderTiny

    ours, default = V.build_vae("tiny"), AutoencoderTiny()
    assert type(ours) is AutoencoderTiny
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == \
        {k: v for k, v in default.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name,kw", [("tiny", {}), ("pruned", {"channel_ratio": 0.25})])
def test_student_decoder_as_pipe_vae_follows_the_decode_contract(name, kw):
    """``pipe.vae = student``: the pipeline's image is exactly decode(latents / scaling_factor) mapped to [0, 1]."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from students.models.unet import build_unet
    from teachers import configs
    from teachers.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=build_unet("tiny").eval(), vae=AutoencoderKL(**configs.tiny_vae()),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs.tiny_text())), tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(**configs.sd15_scheduler(), clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae = V.build_vae(name, **kw).eval()
    run = dict(prompt="a red car", num_inference_steps=1, guidance_scale=1.0)
    with torch.no_grad():
        latents = pipe(**run, output_type="latent", generator=torch.Generator().manual_seed(0)).images
        image = pipe(**run, output_type="pt", generator=torch.Generator().manual_seed(0)).images
        decoded = V.decode(pipe.vae, latents)
    assert image.shape == (1, 3, 128, 128)  # 8x the 16x16 latent
    assert decoded.shape == (1, 3, 128, 128)
    assert torch.allclose(image, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-5)
    assert image.std() > 0


def test_tiny_decoder_save_pretrained_round_trip(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = V.build_vae("tiny").eval()
    vae.save_pretrained(tmp_path)
    loaded = AutoencoderTiny.from_pretrained(tmp_path).eval()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, loaded.decode(z).sample)


@pytest.mark.parametrize("teacher", ["tiny", "shapes"])  # factor 8 (4 levels) and factor 4 (3 levels)
@pytest.mark.parametrize("name,kw", [("tiny", {}), ("pruned", {"channel_ratio": 0.25})])
def test_student_decoder_fit_to_a_teacher_vae_gives_the_teachers_image_size(teacher, name, kw):
    from diffusers import AutoencoderKL

    from teachers import configs
    from teachers.shapes import model as shapes

    vae_config = configs.tiny_vae() if teacher == "tiny" else shapes.vae_config()
    torch.manual_seed(0)
    teacher_vae, student = AutoencoderKL(**vae_config).eval(), V.build_vae(name, **kw, **V.fit(vae_config)).eval()
    z = torch.randn(1, vae_config["latent_channels"], 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = V.decode(teacher_vae, z).shape, V.decode(student, z).shape
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    assert got == want == (1, 3, 4 * factor, 6 * factor)
    with pytest.raises(ValueError, match="upsamplings=4"):
        V.pruned(upsamplings=4)  # SD's VAE has 4 levels: at most factor 8
