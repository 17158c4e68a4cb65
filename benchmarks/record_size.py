"""Bytes per sample by field of the shard record, at SD-1.5 512 px and SDXL 1024 px geometry.

    python benchmarks/record_size.py [--steps 50] [--feature_layers mid_block,up_blocks.0] [--num_feature_steps 2]

Shapes come from the real architectures: the UNets are built on the ``meta`` device (no memory,
no weights) and run once with forward hooks to read each block's output shape; the record is then
encoded by the schema module itself (``shards.record.encode_sample``) from zero arrays of those
shapes, so the figures are the exact bytes the dump writes (npy headers and json included; the
optional png is left out: its size depends on the image). This decides what a 1M-sample dataset costs.
"""

from __future__ import annotations

import argparse
import sys


import numpy as np
import torch

from teachers import configs
from shards import record
from teachers.sampler import SampleResult

ALL_LAYERS = tuple([f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)])


def block_shapes(unet_cfg: dict, latent: int, text_dim: int, xl: bool) -> dict[str, tuple[int, ...]]:
    """Output shape (C, H, W) of every down/mid/up block for one sample, from a meta-device forward."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        shapes = {}
        names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"] + \
                [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        hooks = [unet.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, tuple((o[0] if isinstance(o, tuple) else o).shape[1:])))
            for n in names]
        added = {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)} if xl else None
        unet(torch.zeros(1, 4, latent, latent), torch.tensor([999]), encoder_hidden_states=torch.zeros(1, 77, text_dim),
             added_cond_kwargs=added)
        for h in hooks:
            h.remove()
    return shapes


def record_bytes(name: str, unet_cfg: dict, latent: int, text_dim: int, xl: bool, steps: int, layers, feature_steps: int):
    from diffusers import DDIMScheduler

    shapes = block_shapes(unet_cfg, latent, text_dim, xl)
    layers = [l for l in layers if l in shapes]
    z = lambda *s: np.zeros(s, np.float16)  # noqa: E731
    res = SampleResult(
        key="0123456789abcdef-s0", prompt="a photograph of an astronaut riding a horse on the moon, highly detailed",
        seed=2**62, guidance_scale=7.5, num_tokens=20, prompt_embeds=z(77, text_dim), noise=z(4, latent, latent),
        latents=z(steps + 1, 4, latent, latent), pred_cond=z(steps, 4, latent, latent), pred_uncond=z(steps, 4, latent, latent),
        feature_steps=list(range(feature_steps)), feats={l: z(feature_steps, *shapes[l]) for l in layers},
        pooled_prompt_embeds=z(1280) if xl else None, add_time_ids=z(6) if xl else None,
    )
    sched = DDIMScheduler(**configs.sd15_scheduler(), clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    meta = dict(teacher=name, dtype="bfloat16", scheduler_class="DDIMScheduler",
                scheduler_config={k: v for k, v in sched.config.items() if not k.startswith("_")},
                prediction_type="epsilon", num_inference_steps=steps, timesteps=[int(t) for t in sched.timesteps],
                recorded_steps=list(range(steps)), feature_layers=layers, height=latent * 8, width=latent * 8,
                recipe_hash="0123456789abcdef")
    sample, _ = record.encode_sample(res, meta)
    by_field: dict[str, int] = {}
    for ext, data in sample.items():
        if not ext.startswith("__"):
            by_field[record.field_of(ext)] = by_field.get(record.field_of(ext), 0) + len(data) + 512  # + tar header
    return by_field, shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--feature_layers", default="mid_block,up_blocks.0")
    parser.add_argument("--num_feature_steps", type=int, default=2)
    args = parser.parse_args(argv)
    layers = tuple(x for x in args.feature_layers.split(",") if x)
    geometries = [("SD-1.5 512px", configs.sd15_unet(), 64, 768, False), ("SDXL 1024px", configs.sdxl_unet(), 128, 2048, True)]
    print(f"recipe: {args.steps} recorded steps, features {','.join(layers)} at {args.num_feature_steps} steps, float16; "
          "bytes include the 512-byte tar header per member")
    for name, cfg, latent, text_dim, xl in geometries:
        by_field, shapes = record_bytes(name, cfg, latent, text_dim, xl, args.steps, layers, args.num_feature_steps)
        total = sum(by_field.values())
        print(f"\n{name}  (latent 4x{latent}x{latent})")
        print(f"  {'field':<28}{'KiB/sample':>12}{'share':>8}")
        for field, n in sorted(by_field.items(), key=lambda kv: -kv[1]):
            print(f"  {field:<28}{n / 1024:>12.1f}{n / total:>8.1%}")
        print(f"  {'total':<28}{total / 1024:>12.1f}   -> {total / 2**20:.2f} MiB/sample, "
              f"{total * 1e6 / 2**40:.2f} TiB per 1M samples")
        per_step = {l: 2 * int(np.prod(s)) for l, s in shapes.items()}
        print("  feature cost per timestep (float16): " + ", ".join(f"{l} {b / 1024:.0f} KiB" for l, b in per_step.items()))
        print(f"  all blocks at one timestep: {sum(per_step.values()) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
