"""Records -> training batches: which recorded row a sample trains on (``rows_for``), the rows a
step-distilled student jumps between (``step_rows``, ``step_stride``), and the float32 batch of inputs
and offline targets that ``students.distill.recipes.compute_losses`` takes (``training_batch``).
"""

from __future__ import annotations

from core.errors import UserError
from shards.loader import final_noise_level, noise_levels
from shards.record import RECTIFIED_FLOW, noise_process


def rows_for(meta: dict, recipe, seed: int, epoch: int, key: str) -> tuple[int, int | None]:
    """(row of the recorded trajectory to train on, row of its step-distillation target or None).

    A step-distilled student jumps k = S // student_steps teacher steps: start rows 0, k, 2k, ... with
    r + k <= S (row S = the final latent). The one definition of those rows (``students.export.folder``
    derives the exported scheduler's timesteps from it).
    """
    from students.distill.recipes import choose_row

    recorded = meta["recorded_steps"]
    if recipe.step_weight > 0:
        if recorded != list(range(meta["num_inference_steps"])):
            raise UserError("step distillation needs every teacher step recorded (dump with --record_steps all)")
        candidates = step_rows(len(recorded), recipe.student_steps)
        if recipe.feature_weights:  # step and feature terms on one row: a jump's start with recorded features
            candidates = [r for r in candidates if recorded[r] in meta["feature_steps"]]
            if not candidates:
                raise UserError(f"the recipe's step and feature terms need features at a jump's start "
                                f"(rows {step_rows(len(recorded), recipe.student_steps)}); the dump recorded them at "
                                f"steps {meta['feature_steps']} (dump with more --num_feature_steps)")
        row = choose_row(key, seed, epoch, candidates)
        return row, row + step_stride(len(recorded), recipe.student_steps)
    if recipe.feature_weights:
        return recorded.index(choose_row(key, seed, epoch, meta["feature_steps"])), None
    return choose_row(key, seed, epoch, list(range(len(recorded)))), None


def step_stride(teacher_steps: int, student_steps: int) -> int:
    """k: teacher steps per student step."""
    return max(1, teacher_steps // student_steps)


def step_rows(teacher_steps: int, student_steps: int) -> list[int]:
    """Start rows of the student's jumps: 0, k, 2k, ... with r + k <= teacher_steps."""
    k = step_stride(teacher_steps, student_steps)
    return [r for r in range(0, teacher_steps, k) if r + k <= teacher_steps]


def training_batch(records, negative_prompt_embeds, recipe, *, seed: int, epoch: int, scheduler_config: dict,
                   with_images: bool = False, with_image_latents: bool = False) -> dict:
    """Records -> a float32 batch for ``students.distill.recipes.compute_losses`` (offline targets included).

    ``batch``: keys, z (B,C,h,w), t (B,) float timesteps, alpha/sigma (B,) of z, cond, uncond, x0,
    guidance (B,), and for step distillation z_next with alpha_next/sigma_next; for a rectified-flow dump
    (``shards.record.noise_process``) alpha = 1 - sigma, ``num_train_timesteps`` (t = sigma * it) and
    ``added``/``added_uncond`` holding only ``text_embeds`` (the pooled embeddings); ``image_latents`` (B,4,h,w),
    the real images' latents of a ``--real_images`` dump, with ``with_image_latents``.
    """
    import numpy as np
    import torch

    cols: dict[str, list] = {k: [] for k in ("keys", "z", "t", "alpha", "sigma", "cond", "x0", "guidance", "pred_cond",
                                             "pred_uncond", "z_next", "alpha_next", "sigma_next")}
    feats: dict[str, list] = {name: [] for name in recipe.teacher_layers()}
    for rec in records:
        meta = rec.meta
        final = final_noise_level(meta if "schema_version" in meta else scheduler_config)
        row, nxt = rows_for(meta, recipe, seed, epoch, rec.key)
        timesteps, alphas, sigmas = noise_levels(meta, scheduler_config)
        cols["keys"].append(rec.key)
        cols["z"].append(rec.latents[row])
        cols["t"].append(timesteps[row])
        cols["alpha"].append(alphas[row])
        cols["sigma"].append(sigmas[row])
        cols["cond"].append(rec.prompt_embeds)
        cols["x0"].append(rec.latents[-1])
        cols["guidance"].append(meta["guidance_scale"])
        cols["pred_cond"].append(rec.pred_cond[row])
        cols["pred_uncond"].append(rec.pred_uncond[row])
        if nxt is not None:
            cols["z_next"].append(rec.latents[nxt])
            a_next, s_next = (alphas[nxt], sigmas[nxt]) if nxt < len(timesteps) else final
            cols["alpha_next"].append(a_next)
            cols["sigma_next"].append(s_next)
        step = meta["recorded_steps"][row]
        for name in feats:
            feats[name].append(rec.feats[name][meta["feature_steps"].index(step)])
    f32 = lambda xs: torch.from_numpy(np.stack(xs).astype(np.float32))  # noqa: E731
    vec = lambda xs: torch.tensor(np.asarray(xs, np.float64), dtype=torch.float32)  # noqa: E731
    if not isinstance(negative_prompt_embeds, dict):
        negative_prompt_embeds = {"negative_prompt_embeds": negative_prompt_embeds}
    expand = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None].expand(len(records), *np.shape(a))  # noqa: E731
    batch = {"keys": cols["keys"], "z": f32(cols["z"]), "t": vec(cols["t"]), "alpha": vec(cols["alpha"]),
             "sigma": vec(cols["sigma"]), "cond": f32(cols["cond"]), "x0": f32(cols["x0"]),
             "guidance": vec(cols["guidance"]), "uncond": expand(negative_prompt_embeds["negative_prompt_embeds"])}
    flow = noise_process(records[0].meta) == RECTIFIED_FLOW
    if flow:  # SD3-style conditioning: the pooled text embeds alone; the student's time input is sigma * T
        batch["num_train_timesteps"] = float(records[0].meta["scheduler_config"].get("num_train_timesteps", 1000))
    if flow and "pooled_prompt_embeds" in records[0].arrays:
        batch["added"] = {"text_embeds": f32([rec.pooled_prompt_embeds for rec in records])}
        batch["added_uncond"] = {"text_embeds": expand(negative_prompt_embeds["negative_pooled_prompt_embeds"])}
    elif "pooled_prompt_embeds" in records[0].arrays:  # SDXL-style conditioning: pooled text embeds and time ids
        time_ids = f32([rec.add_time_ids for rec in records])
        batch["added"] = {"text_embeds": f32([rec.pooled_prompt_embeds for rec in records]), "time_ids": time_ids}
        batch["added_uncond"] = {"text_embeds": expand(negative_prompt_embeds["negative_pooled_prompt_embeds"]),
                                 "time_ids": time_ids}
    targets = {"pred_cond": f32(cols["pred_cond"]), "pred_uncond": f32(cols["pred_uncond"]),
               "feats": {k: f32(v) for k, v in feats.items()}}
    if cols["z_next"]:
        batch["z_next"], batch["alpha_next"], batch["sigma_next"] = f32(cols["z_next"]), vec(cols["alpha_next"]), vec(cols["sigma_next"])
    if with_image_latents:  # the adversary's real side (--adv_real image)
        missing = [rec.key for rec in records if "image_latents" not in rec.arrays]
        if missing:
            raise UserError(f"sample {missing[0]!r} has no image_latents member: --adv_real image needs a dump made "
                            "with --real_images")
        batch["image_latents"] = f32([rec.image_latents for rec in records])
    if with_images:  # the teacher decoder's images, (B, 3, H, W) in [-1, 1]
        batch["image"] = torch.stack([_png_to_tensor(rec) for rec in records])
    return {"batch": batch, "targets": targets}


def _png_to_tensor(rec):
    import io

    import numpy as np
    import torch
    from PIL import Image

    if rec.image_png is None:
        raise UserError(f"sample {rec.key!r} has no image: decoder distillation needs a dump made with --save_images")
    image = np.asarray(Image.open(io.BytesIO(rec.image_png)).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(image).permute(2, 0, 1)
