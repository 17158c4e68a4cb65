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

Two architectures (``ARCHS``) share the autoencoder, the text encoder's shape and the analyser:

- ``shapes`` (``weights/``, ``load_teacher("shapes")``): two levels, one ResNet per stage, trailing
  timestep spacing; trained on all 450 scenes;
- ``sd15`` (``weights_sd15/``, ``load_teacher("shapes-sd15")``): SD-1.5's UNet layout scaled down
  (three levels, cross-attention in the two upper ones, two ResNet+transformer pairs per down stage
  and three per up stage, a cross-attention mid stage) and SD-1.5's own scheduler (leading spacing,
  ``steps_offset=1``), so BK-SDM's and SnapFusion's block cuts apply to it as to SD-1.5; it reuses
  the ``shapes`` autoencoder and analyser and trains its UNet and text encoder on the training split
  only (``world.train_scenes``), so ``world.heldout_scenes`` are captions it never saw.
"""

from __future__ import annotations

import json
import os

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
WEIGHTS_DIR_SD15 = os.path.join(os.path.dirname(__file__), "weights_sd15")
ARCHS = ("shapes", "sd15")
WEIGHTS_DIRS = {"shapes": WEIGHTS_DIR, "sd15": WEIGHTS_DIR_SD15}
TRAIN_COMMANDS = {
    "shapes": "python -m teachers.shapes.train --output teachers/shapes/weights",
    "sd15": "python -m teachers.shapes.train --arch sd15 --unet_steps 5000 --output /tmp/sd15_5k, then "
            "python -m teachers.shapes.train --arch sd15 --init_from /tmp/sd15_5k --unet_steps 4000",
}
COMPONENTS = ("unet", "vae", "text_encoder")
_TOKEN_SUFFIX = "embeddings.token_embedding.weight"  # transformers 4.x prefixes "text_model."


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"shapes teacher arch {arch!r} is not one of {', '.join(ARCHS)}")


def unet_config(arch: str = "shapes") -> dict:
    _check_arch(arch)
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


def vae_config() -> dict:
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


def scheduler_config(arch: str = "shapes") -> dict:
    """``sd15``: SD-1.5's own DDIM configuration (``leading`` spacing, ``steps_offset=1``, as its
    ``scheduler_config.json``). ``shapes``: SD-1.5's noise schedule with trailing timestep spacing (Lin et al. 2024, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed"): the first step starts at t = 999 at any step count,
    and an n-step schedule is every (N/n)-th step of an N-step one, so step-distilled students
    sample exactly the timesteps they were trained on."""
    from teachers import configs

    _check_arch(arch)
    if arch == "sd15":
        return dict(configs.sd15_scheduler(), clip_sample=False, set_alpha_to_one=False)
    # steps_offset 1 (SD-1.5's own): trailing spacing ignores it in DDIM, Euler and DPM-Solver++ (their
    # trailing timesteps are round(T - k T / n) - 1), and diffusers warns on every pipeline built with any
    # other value
    return dict(configs.sd15_scheduler(), timestep_spacing="trailing", steps_offset=1, clip_sample=False,
                set_alpha_to_one=False)


def configs_dict(arch: str = "shapes") -> dict:
    return dict(unet=unet_config(arch), vae=vae_config(), text=text_config())


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
    import hashlib

    import torch
    from safetensors.torch import save as save_bytes

    from core.fs import atomic_write_bytes, atomic_write_json

    os.makedirs(folder, exist_ok=True)
    digests = {}
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
        if name == "text_encoder":
            key = _token_key(state)
            table = state.pop(key)
            ids = torch.tensor(token_ids, dtype=torch.int64)
            rest = torch.ones(table.shape[0], dtype=torch.bool)
            rest[ids] = False
            if table[rest].abs().max() > 0:
                raise ValueError("token rows outside the world's vocabulary are not zero: the sparse table would lose them")
            state[key + ".ids"] = ids
            state[key + ".rows"] = table[ids].contiguous()
        data = save_bytes(state)
        atomic_write_bytes(os.path.join(folder, f"{name}.safetensors"), data)
        digests[name] = hashlib.sha256(data).hexdigest()
    atomic_write_json(os.path.join(folder, "weights.json"), dict(meta, sha256=digests))


def load_weights(folder: str, unet, vae, text_encoder, arch: str = "shapes") -> dict:
    """Load the committed weights into freshly built modules (in place); returns ``weights.json``.
    ``arch`` only names the training command in the error when ``folder`` holds no weights."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(folder, "weights.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shapes teacher weights in {folder!r}: train them with `{TRAIN_COMMANDS[arch]}`")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        state = load_file(os.path.join(folder, f"{name}.safetensors"))
        if name == "text_encoder":
            key = _token_key(module.state_dict())
            ids, rows = state.pop(key + ".ids"), state.pop(key + ".rows")
            table = torch.zeros_like(module.state_dict()[key], dtype=torch.float16)
            table[ids] = rows
            state[key] = table
        dtype = next(module.parameters()).dtype
        module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    return meta
