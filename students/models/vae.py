"""Small image decoders with the SD VAE's decode contract, as stock diffusers autoencoders.

A student decoder takes the latents the UNet produces and returns an image in [-1, 1]; the diffusers
pipelines call ``vae.decode(latents / vae.config.scaling_factor).sample``, so either preset can be
set as ``pipe.vae = build_vae("tiny")`` or passed to a pipeline's constructor, and saves/loads with
``save_pretrained``/``from_pretrained`` of the stock class (no custom code needed to load it):

- ``pruned``: SD's KL-f8 decoder (``teachers.configs.sd_vae()``) with every width scaled by a channel
  ratio; 0.5 is SnapFusion's uniform 50% pruning (arXiv 2306.00980, Sec. 3.3: about 13M decoder
  parameters against 49.5M), trained by data distillation from teacher latents (no encoder, no real
  images). It is an ``AutoencoderKL`` whose encoder is pruned too but unused.
- ``tiny``: TAESD (madebyollin/taesd, 1.22M decoder parameters), which diffusers ships as
  ``AutoencoderTiny``. TAESD decodes the UNet-space latents directly, hence ``scaling_factor`` 1.0.

Both follow the teacher's autoencoder: ``upsamplings`` (its ``len(block_out_channels) - 1``; 3 = SD's
factor 8, 2 = the ``shapes`` teacher's factor 4) and ``latent_channels``, which ``fit`` reads off a
teacher VAE config and the trainer off the dump, so the student decodes the teacher's latents to the
teacher's image size. Presets return the keyword arguments of the diffusers class, like ``teachers/configs.py``.
"""

from __future__ import annotations

from teachers.configs import sd_vae

SD_SCALING_FACTOR = 0.18215  # SD-1.x/2.x latents; SDXL's VAE uses 0.13025


def _prune(channels: int, ratio: float, groups: int) -> int:
    """``channels * ratio`` rounded to a positive multiple of the GroupNorm groups."""
    return max(groups, int(round(channels * ratio / groups)) * groups)


def _check_upsamplings(upsamplings: int, most: int) -> None:
    if not 1 <= upsamplings <= most:
        raise ValueError(f"upsamplings={upsamplings!r} must be in [1, {most}] (image side = latent side * 2^upsamplings)")


def pruned(channel_ratio: float = 0.5, scaling_factor: float = SD_SCALING_FACTOR, sample_size: int = 512,
           upsamplings: int = 3, latent_channels: int = 4) -> dict:
    """``AutoencoderKL`` kwargs: SD's VAE with widths (128, 256, 512, 512) scaled by ``channel_ratio``
    (SnapFusion: 0.5 -> (64, 128, 256, 256), 12.4M decoder parameters). At SD's factor 8 (3 upsamplings)
    and 4 latent channels its latent space is SD's, so it decodes the teacher's latents; a teacher with
    fewer upsamplings keeps SD's first ``upsamplings + 1`` levels (factor 4: (64, 128, 256))."""
    if not 0 < channel_ratio <= 1:
        raise ValueError(f"channel_ratio={channel_ratio!r} must be in (0, 1]")
    cfg = sd_vae(sample_size=sample_size, scaling_factor=scaling_factor)
    _check_upsamplings(upsamplings, len(cfg["block_out_channels"]) - 1)
    levels = upsamplings + 1  # diffusers' Encoder/Decoder resample between consecutive levels
    groups = 32  # SD VAE's GroupNorm groups (diffusers' default norm_num_groups)
    cfg["block_out_channels"] = tuple(_prune(c, channel_ratio, groups) for c in cfg["block_out_channels"][:levels])
    cfg["down_block_types"], cfg["up_block_types"] = cfg["down_block_types"][:levels], cfg["up_block_types"][:levels]
    cfg["norm_num_groups"] = groups
    cfg["latent_channels"] = latent_channels
    return cfg


def tiny(latent_channels: int = 4, upsamplings: int = 3) -> dict:
    """``AutoencoderTiny`` kwargs: TAESD's architecture (diffusers' defaults spelled out); at another
    factor its stages of 3 blocks number ``upsamplings`` (TAESD: 3), then its last single block."""
    _check_upsamplings(upsamplings, 6)
    return dict(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(64,) * (upsamplings + 1),
        decoder_block_out_channels=(64,) * (upsamplings + 1),
        act_fn="relu",
        latent_channels=latent_channels,
        upsampling_scaling_factor=2,
        num_encoder_blocks=(1,) + (3,) * upsamplings,
        num_decoder_blocks=(3,) * upsamplings + (1,),
        latent_magnitude=3,
        latent_shift=0.5,
        force_upcast=False,
        scaling_factor=1.0,
    )


VAE_PRESETS = {"pruned": pruned, "tiny": tiny}


def fit(vae_config: dict) -> dict:
    """The preset kwargs that make a student decoder take this teacher VAE's latents to its image size."""
    return {"upsamplings": len(vae_config["block_out_channels"]) - 1, "latent_channels": int(vae_config["latent_channels"])}


def build_vae(name: str, **preset_kwargs):
    """A student decoder (random weights) by preset name: ``pruned`` -> ``AutoencoderKL``, ``tiny`` ->
    ``AutoencoderTiny``. ``preset_kwargs`` go to the preset function (``channel_ratio``, ...)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; known: {sorted(VAE_PRESETS)}")
    cls = AutoencoderKL if name == "pruned" else AutoencoderTiny
    return cls(**VAE_PRESETS[name](**preset_kwargs))


def decoder_modules(vae) -> list:
    """The modules that decoding runs (``decoder`` plus ``post_quant_conv`` where the class has one)."""
    modules = [vae.decoder]
    if getattr(vae, "post_quant_conv", None) is not None:
        modules.append(vae.post_quant_conv)
    return modules


def decoder_parameters(vae) -> int:
    """Parameters used by ``decode`` (the encoder is not counted: students are decoders)."""
    return sum(p.numel() for m in decoder_modules(vae) for p in m.parameters())


def decode(vae, latents):
    """The pipelines' decode step: UNet-space ``latents (B, C, h, w)`` -> image ``(B, 3, 2^u h, 2^u w)`` in about
    [-1, 1] (u: the preset's upsamplings; SD's 3)."""
    return vae.decode(latents / vae.config.scaling_factor).sample
