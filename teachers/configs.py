"""Model configurations of the built-in teachers, as plain dicts that diffusers/transformers take.

``sd15_*`` and ``sdxl_*`` are the published architectures of Stable Diffusion 1.5
(runwayml/stable-diffusion-v1-5 ``unet/config.json``, ``vae/config.json``, ``text_encoder``
= OpenAI CLIP ViT-L/14 text tower) and SDXL base 1.0 (``unet`` with ``text_time`` conditioning,
two text encoders: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14); ``sd3_*`` is Stable Diffusion 3 Medium
(an MMDiT flow-matching transformer, below). ``tiny_*`` are the same shapes
scaled down for tests (after diffusers' ``get_dummy_components``), with the real CLIP vocabulary.

Each function returns a fresh dict, so callers may ``dict(cfg, key=value)`` without aliasing.
Students (``students/``) import these to build reference architectures for cost ratios.
"""

from __future__ import annotations

CLIP_VOCAB_SIZE = 49408  # CLIP BPE: 256 bytes x2 + 48894 merges + <|startoftext|>, <|endoftext|>
CLIP_MAX_LENGTH = 77  # tokens, incl. BOS/EOS (the text encoders' position table)
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407

# --------------------------------------------------------------------------------------------
# Stable Diffusion 1.5
# --------------------------------------------------------------------------------------------


def sd15_unet() -> dict:
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sd_vae(sample_size: int = 512, scaling_factor: float = 0.18215) -> dict:
    """The SD 1.x/2.x/XL KL-f8 autoencoder (83.7M parameters; decoder 49.5M)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def clip_l_text() -> dict:
    """OpenAI CLIP ViT-L/14 text tower (123M parameters), SD-1.5's text encoder."""
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=1,
    )


def sd15_scheduler() -> dict:
    """SD-1.5's noise schedule (scaled_linear 0.00085..0.012 over 1000 steps, epsilon)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )


# --------------------------------------------------------------------------------------------
# SDXL base 1.0
# --------------------------------------------------------------------------------------------


def sdxl_unet() -> dict:
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled
        norm_num_groups=32,
    )


def clip_l_text_xl() -> dict:
    """SDXL's first text encoder: CLIP ViT-L/14 text tower, penultimate layer used."""
    return clip_l_text()


def clip_bigg_text() -> dict:
    """SDXL's second text encoder: OpenCLIP ViT-bigG/14 text tower with projection (695M)."""
    return dict(clip_l_text(), hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280)


# --------------------------------------------------------------------------------------------
# tiny: SD-shaped, a few hundred thousand UNet parameters, VAE factor 8 like the real ones
# --------------------------------------------------------------------------------------------


def tiny_unet() -> dict:
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae() -> dict:
    # Four blocks so the latent is 1/8 of the image side, as in SD.
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=0.18215,
    )


def tiny_text() -> dict:
    """CLIP-L's text tower shrunk to width 32, 2 layers (the real 49,408-token vocabulary and 77 positions)."""
    return dict(clip_l_text(), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=32)


def tiny_xl_unet() -> dict:
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,  # 32 (text encoder 1) + 32 (text encoder 2), concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled 32
        norm_num_groups=8,
    )


def tiny_xl_text_2() -> dict:
    return dict(tiny_text(), hidden_act="gelu")


# --------------------------------------------------------------------------------------------
# Stable Diffusion 3 (Medium): an MMDiT flow-matching transformer
# --------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-3-medium-diffusers: ``transformer/config.json`` (24 joint blocks of
# width 24 x 64 = 1536 over 2x2 patches of 16-channel latents, about 2B parameters; Esser et al.
# 2024, "Scaling Rectified Flow Transformers", depth 24), ``vae/config.json`` (the 16-channel KL-f8
# autoencoder with a shift factor), ``scheduler`` (FlowMatchEulerDiscreteScheduler, shift 3.0), and
# the text encoders CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, both with projection (pooled 768 + 1280
# = 2048). The T5-XXL encoder (text_encoder_3) is optional in diffusers and left out here: its
# place in the prompt embeddings is zeros, as StableDiffusion3Pipeline fills it without T5.


def sd3_medium_transformer() -> dict:
    return dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )


def sd3_vae() -> dict:
    """SD3's 16-channel KL-f8 autoencoder (no quant convs; latents = (mean - shift) * scale)."""
    return dict(sd_vae(1024, 1.5305), latent_channels=16, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False)


def sd3_scheduler() -> dict:
    """SD3's rectified-flow schedule: sigma = shift s / (1 + (shift - 1) s) of the uniform s (shift 3)."""
    return dict(num_train_timesteps=1000, shift=3.0)


def sd3_clip_l_text() -> dict:
    """SD3's first text encoder: CLIP ViT-L/14 with its projection (pooled 768)."""
    return clip_l_text()


def sd3_clip_g_text() -> dict:
    """SD3's second text encoder: OpenCLIP ViT-bigG/14 with its projection (pooled 1280)."""
    return clip_bigg_text()


def tiny_sd3_transformer() -> dict:
    """SD3's layout shrunk: 4 joint blocks of width 4 x 8 = 32, 2x2 patches of 16-channel latents.
    ``joint_attention_dim`` 96 > 32 + 32, so the CLIP states are zero-padded as SD3's 2048 are to 4096."""
    return dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=64,  # 32 + 32 pooled, concatenated
        out_channels=16,
        pos_embed_max_size=16,  # latent sides up to 32 (256 px)
    )


def tiny_sd3_vae() -> dict:
    return dict(tiny_vae(), latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                use_post_quant_conv=False)
