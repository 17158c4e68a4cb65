"""The ``shapes`` teacher: a small SD-1.5-shaped pipeline trained here on the shapes world.

Same parts as Stable Diffusion 1.5, scaled to 32 px images: a KL autoencoder with factor 4 (8x8x4
latents), a cross-attention UNet, a CLIP text transformer over the real CLIP BPE vocabulary, and
SD-1.5's noise schedule. ``python -m teachers.shapes.train`` trains it from scratch; its weights
(float16 safetensors, a few MB) sit in ``teachers/shapes/weights/`` and ``load_teacher("shapes")``
loads them.

Only the few dozen token ids the world's captions use ever get a gradient, so the text encoder's
token table is stored sparsely: the used rows and their ids. Every other row is zero at
initialisation and stays zero in training (AdamW leaves a parameter with zero gradient and zero
value where it is), so the sparse file reproduces the trained table exactly.

Three architectures (``ARCHS``) share the autoencoder, the text encoder's shape and the analyser:

- ``shapes`` (``weights/``, ``load_teacher("shapes")``): two levels, one ResNet per stage, trailing
  timestep spacing; trained on all 450 scenes;
- ``sd15`` (``weights_sd15/``, ``load_teacher("shapes-sd15")``): SD-1.5's UNet layout scaled down
  (three levels, cross-attention in the two upper ones, two ResNet+transformer pairs per down stage
  and three per up stage, a cross-attention mid stage) and SD-1.5's own scheduler (leading spacing,
  ``steps_offset=1``), so BK-SDM's and SnapFusion's block cuts apply to it as to SD-1.5; it reuses
  the ``shapes`` autoencoder and analyser and trains its UNet and text encoder on the training split
  only (``world.train_scenes``), so ``world.heldout_scenes`` are captions it never saw;
- ``sd3`` (``weights_sd3/``, ``load_teacher("shapes-sd3")``): Stable Diffusion 3's flow-matching parts
  as diffusers' own ``StableDiffusion3Pipeline`` runs them: an MMDiT (``SD3Transformer2DModel``) over
  the same 8x8x4 latents, two CLIP text encoders with projection (each the shapes text encoder's size,
  each with its own sparse token table; no T5, ``text_encoder_3=None``) and the
  ``FlowMatchEulerDiscreteScheduler``; trained with SD3's rectified-flow objective on the training
  split only, reusing the ``shapes`` autoencoder (with ``shift_factor=0.0``, see ``vae_config``).

``sd3``'s prompt states are what ``StableDiffusion3Pipeline.encode_prompt`` makes of them: the two CLIP
encoders' penultimate states side by side (64 + 64 = ``joint_attention_dim`` 128, so no zero padding of
the width), ``SD3_CLIP_TOKENS`` (16) tokens long, because the pipeline takes the CLIP length from its
tokenizers' ``model_max_length`` and every caption of the world is 13 or 14 tokens with BOS and EOS;
then the pipeline appends T5's states, zeros without T5: ``max_sequence_length`` tokens of width 128.
That length is an argument of every pipeline call (default 256; the project's sampler and dump take the
default), not a setting of the pipeline, so the teacher is trained on the default's 256 zero tokens:
16 + 256 = 272 prompt tokens at every call that does not pass another value.
"""

from __future__ import annotations

import json
import os

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
WEIGHTS_DIR_SD15 = os.path.join(os.path.dirname(__file__), "weights_sd15")
WEIGHTS_DIR_SD3 = os.path.join(os.path.dirname(__file__), "weights_sd3")
ARCHS = ("shapes", "sd15", "sd3")
WEIGHTS_DIRS = {"shapes": WEIGHTS_DIR, "sd15": WEIGHTS_DIR_SD15, "sd3": WEIGHTS_DIR_SD3}
TRAIN_COMMANDS = {
    "shapes": "python -m teachers.shapes.train --output teachers/shapes/weights",
    "sd15": "python -m teachers.shapes.train --arch sd15 --unet_steps 5000 --output /tmp/sd15_5k, then "
            "python -m teachers.shapes.train --arch sd15 --init_from /tmp/sd15_5k --unet_steps 4000",
    "sd3": "python -m teachers.shapes.train --arch sd3 --unet_steps 6000 --threads 1",  # 2-2.7 h (train.py's docstring)
}
COMPONENTS = ("unet", "vae", "text_encoder")
SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
SD3_CLIP_TOKENS = 16  # CLIP tokens of the sd3 arch's prompts (its tokenizers' model_max_length): captions are <= 14
SD3_T5_TOKENS = 256  # T5 zero tokens StableDiffusion3Pipeline appends at its default max_sequence_length
_TOKEN_SUFFIX = "embeddings.token_embedding.weight"  # transformers 4.x prefixes "text_model."


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"shapes teacher arch {arch!r} is not one of {', '.join(ARCHS)}")


def components(arch: str = "shapes") -> tuple[str, ...]:
    """The weight files (``NAME.safetensors``) of an arch: ``SD3_COMPONENTS`` for sd3, else ``COMPONENTS``."""
    _check_arch(arch)
    return SD3_COMPONENTS if arch == "sd3" else COMPONENTS


def unet_config(arch: str = "shapes") -> dict:
    _check_arch(arch)
    if arch == "sd3":
        raise ValueError("shapes teacher arch 'sd3' has a transformer (transformer_config), not a UNet")
    if arch == "sd15":
        return unet_config_sd15()
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(48, 96),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def unet_config_sd15() -> dict:
    """SD-1.5's UNet (``teachers.configs.sd15_unet``) with its lowest level removed and narrow widths
    for 8x8 latents: levels at 8x8, 4x4 and 2x2, the same block types and ``layers_per_block=2`` as
    SD-1.5's last three levels, and the last two widths equal as in SD-1.5 (so ``bk_tiny``'s mid
    stage still meets its widths). 2.2M parameters, the size of the ``shapes`` UNet, in more and
    narrower blocks (a training step costs about twice as much)."""
    from teachers import configs

    return dict(
        configs.sd15_unet(),
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=64,
        attention_head_dim=8,  # SD-1.5's value; diffusers reads it as the number of heads
        norm_num_groups=16,
    )


def transformer_config() -> dict:
    """The sd3 arch's MMDiT: SD3-Medium's ``SD3Transformer2DModel`` (``teachers.configs``) at 8x8x4 latents.
    Patch size 1 (64 image tokens: 2x2 patches would leave a 4x4 grid for a world whose positions are
    a 3x3 grid of 32 px images), 6 joint blocks of width 3 x 32 = 96, the last context-pre-only as in
    SD3; ``joint_attention_dim`` 128 = the two CLIP widths side by side, ``pooled_projection_dim`` 128 =
    the two pooled projections. 1.98M parameters, the size of the sd15 UNet (2.2M); its training step
    costs about what the sd15 UNet's does (``teachers.shapes.train``)."""
    from teachers import configs

    width = 2 * text_config()["hidden_size"]
    return dict(
        configs.sd3_medium_transformer(),
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=3,
        joint_attention_dim=width,
        caption_projection_dim=96,  # = the blocks' width, as in SD3 (1536)
        pooled_projection_dim=width,
        pos_embed_max_size=16,  # latent sides up to 16 (64 px), twice the trained 8 as in tiny-sd3
    )


def vae_config(arch: str = "shapes") -> dict:
    """The autoencoder of every arch. ``sd3``: the same one with ``shift_factor=0.0``, because
    ``StableDiffusion3Pipeline`` decodes ``latents / scaling_factor + shift_factor`` (and SD3's VAE has
    one); the shapes latents were never shifted (``latents = mean * scaling_factor``), so zero keeps them
    as the other archs see them."""
    _check_arch(arch)
    if arch == "sd3":
        return dict(vae_config(), shift_factor=0.0)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=1.0,  # set by training: 1 / std of the training latents
    )


def text_config() -> dict:
    from teachers import configs

    return dict(configs.clip_l_text(), hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, projection_dim=64)


def text_config_2() -> dict:
    """The sd3 arch's second text encoder: the shapes text encoder's size with OpenCLIP bigG's GELU (as
    ``teachers.configs.tiny_xl_text_2`` is the tiny one with it); SD3's second encoder is bigG."""
    return dict(text_config(), hidden_act="gelu")


def tokenizers(arch: str = "shapes") -> tuple:
    """The arch's CLIP tokenizers: one (padding with ``<|endoftext|>``) for the UNet archs; for sd3 two,
    the second padding with ``"!"`` as OpenCLIP bigG's does, both with ``model_max_length`` ``SD3_CLIP_TOKENS``."""
    from teachers.tokenizer import clip_tokenizer

    _check_arch(arch)
    if arch != "sd3":
        return (clip_tokenizer(),)
    toks = clip_tokenizer(), clip_tokenizer(pad_token="!")
    for tok in toks:
        tok.model_max_length = SD3_CLIP_TOKENS
    return toks


def scheduler_config(arch: str = "shapes") -> dict:
    """``sd3``: SD3's ``FlowMatchEulerDiscreteScheduler`` with ``shift`` 1.0 (no shift) for 8x8 latents.
    SD3's shift 3.0 belongs to 1024 px: Esser et al. 2024 move a schedule trained at a base resolution
    to m pixels by t' = a t / (1 + (a - 1) t) with a = sqrt(m / n) against the base's n (256 px), because
    more pixels keep more signal at the same noise level, and SD3's 1024 px model samples with a = 3.
    This teacher is trained at its own 32 px with SD3's unshifted logit-normal sigmas, the paper's
    base-resolution recipe, so no schedule needs moving: shift 1 samples the noise levels as they were
    trained (the formula's sqrt(32^2 / 256^2) = 1/8 maps a 256 px model down, which this is not).
    ``sd15``: SD-1.5's own DDIM configuration (``leading`` spacing, ``steps_offset=1``, as its
    ``scheduler_config.json``). ``shapes``: SD-1.5's noise schedule with trailing timestep spacing (Lin et al. 2024, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed"): the first step starts at t = 999 at any step count,
    and an n-step schedule is every (N/n)-th step of an N-step one, so step-distilled students
    sample exactly the timesteps they were trained on."""
    from teachers import configs

    _check_arch(arch)
    if arch == "sd3":
        return dict(configs.sd3_scheduler(), shift=1.0)
    if arch == "sd15":
        return dict(configs.sd15_scheduler(), clip_sample=False, set_alpha_to_one=False)
    # steps_offset 1 (SD-1.5's own): trailing spacing ignores it in DDIM, Euler and DPM-Solver++ (their
    # trailing timesteps are round(T - k T / n) - 1), and diffusers warns on every pipeline built with any
    # other value
    return dict(configs.sd15_scheduler(), timestep_spacing="trailing", steps_offset=1, clip_sample=False,
                set_alpha_to_one=False)


def configs_dict(arch: str = "shapes") -> dict:
    """The arch's component configs; for sd3 in ``teachers.load.build_sd3``'s keys (``transformer``,
    ``vae``, ``text``, ``text_2``, ``scheduler``)."""
    if arch == "sd3":
        return dict(transformer=transformer_config(), vae=vae_config("sd3"), text=text_config(), text_2=text_config_2(),
                    scheduler=scheduler_config("sd3"))
    return dict(unet=unet_config(arch), vae=vae_config(), text=text_config())


def build_modules(arch: str = "shapes") -> dict:
    """Freshly built modules of an arch (float32, from the current torch RNG), keyed as ``components``."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = configs_dict(arch)
    if arch != "sd3":
        return dict(unet=UNet2DConditionModel(**cfg["unet"]), vae=AutoencoderKL(**cfg["vae"]),
                    text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text"])))
    return dict(transformer=SD3Transformer2DModel(**cfg["transformer"]), vae=AutoencoderKL(**cfg["vae"]),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text"])),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"])))


def sd3_pipeline(transformer, vae, text_encoder, text_encoder_2):
    """diffusers' own ``StableDiffusion3Pipeline`` of the sd3 arch's modules: its tokenizers and
    scheduler, no T5 (``text_encoder_3=None``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok, tok_2 = tokenizers("sd3")
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tok_2, text_encoder_3=None,
                                    tokenizer_3=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config("sd3")))


def world_token_ids(tokenizer, scenes=None) -> list[int]:
    """Token ids the world's captions (of ``scenes``; default all) and the empty prompt use (BOS, EOS
    and padding included)."""
    from teachers.shapes import world

    texts = [world.caption(s) for s in (world.all_scenes() if scenes is None else scenes)] + [""]
    ids = set()
    for batch in (texts[i : i + 256] for i in range(0, len(texts), 256)):
        ids.update(int(t) for row in tokenizer(batch, padding="max_length", max_length=77)["input_ids"] for t in row)
    return sorted(ids)


def _token_key(state: dict) -> str:
    (key,) = [k for k in state if k.endswith(_TOKEN_SUFFIX)]
    return key


def save_weights(folder: str, unet, vae, text_encoder, token_ids: list[int], meta: dict) -> None:
    """float16 safetensors per component (the text encoder's token table sparse) + ``weights.json``."""
    save_components(folder, dict(unet=unet, vae=vae, text_encoder=text_encoder), dict(text_encoder=token_ids), meta)


def save_components(folder: str, modules: dict, token_ids: dict, meta: dict) -> None:
    """float16 safetensors per module (``NAME.safetensors``; each text encoder's token table sparse: the
    rows of ``token_ids[NAME]`` and their ids) + ``weights.json`` (``meta`` and the files' sha256)."""
    import hashlib

    import torch
    from safetensors.torch import save as save_bytes

    from core.fs import atomic_write_bytes, atomic_write_json

    os.makedirs(folder, exist_ok=True)
    digests = {}
    for name, module in modules.items():
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
        if name in token_ids:
            key = _token_key(state)
            table = state.pop(key)
            ids = torch.tensor(token_ids[name], dtype=torch.int64)
            rest = torch.ones(table.shape[0], dtype=torch.bool)
            rest[ids] = False
            if table[rest].abs().max() > 0:
                raise ValueError(f"{name}: token rows outside the world's vocabulary are not zero: the sparse table "
                                 "would lose them")
            state[key + ".ids"] = ids
            state[key + ".rows"] = table[ids].contiguous()
        data = save_bytes(state)
        atomic_write_bytes(os.path.join(folder, f"{name}.safetensors"), data)
        digests[name] = hashlib.sha256(data).hexdigest()
    atomic_write_json(os.path.join(folder, "weights.json"), dict(meta, sha256=digests))


def load_weights(folder: str, unet, vae, text_encoder, arch: str = "shapes") -> dict:
    """Load the committed weights into freshly built modules (in place); returns ``weights.json``.
    ``arch`` only names the training command in the error when ``folder`` holds no weights."""
    return load_components(folder, dict(unet=unet, vae=vae, text_encoder=text_encoder), arch)


def load_components(folder: str, modules: dict, arch: str = "shapes") -> dict:
    """``load_weights`` for any arch's modules (keyed as ``components(arch)``): safetensors only (no
    pickle), every text encoder's sparse token table filled back into a zero table."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(folder, "weights.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shapes teacher weights in {folder!r}: train them with `{TRAIN_COMMANDS[arch]}`")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    for name, module in modules.items():
        state = load_file(os.path.join(folder, f"{name}.safetensors"))
        if name.startswith("text_encoder"):
            key = _token_key(module.state_dict())
            ids, rows = state.pop(key + ".ids"), state.pop(key + ".rows")
            table = torch.zeros_like(module.state_dict()[key], dtype=torch.float16)
            table[ids] = rows
            state[key] = table
        dtype = next(module.parameters()).dtype
        module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    modules["vae"].register_to_config(scaling_factor=float(meta["scaling_factor"]))
    return meta
