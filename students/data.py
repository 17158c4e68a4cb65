"""Reading distillation shards: a WebDataset pipeline that yields decoded ``teachers.record.Record``s.

    from students.data import dataset_shards, record_pipeline
    pipeline = record_pipeline(dataset_shards("out/dump"))
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)

Shards are split by node (``torch.distributed`` rank) and then by DataLoader worker, so every
sample is read exactly once per epoch across all ranks and workers. Decoding goes through the
schema module only. A corrupt sample is skipped, counted in ``ReadStats`` and logged at a limited
rate; it never stops the reader and never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from teachers import record
from teachers.fs import url_to_fs
from teachers.shards import join, list_indexes, shard_name

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReadStats:
    """Per-process counters (each DataLoader worker holds its own copy)."""

    samples: int = 0
    skipped: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    _last_log: float = 0.0

    def skip(self, reason: str, detail: str, min_interval_s: float = 10.0) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_log >= min_interval_s:  # rate-limited: a bad shard must not flood the log
            log.warning("skipped corrupt sample (%s): %s [%d skipped so far]", reason, detail, self.skipped)
            self._last_log = now


STATS = ReadStats()


def dataset_shards(data_dir: str) -> list[str]:
    """Paths/URLs of a dataset's complete shards: those listed in ``dataset.json``, else those with an index."""
    fs, path = url_to_fs(join(data_dir, "dataset.json"))
    if fs.exists(path):  # noqa: SIM108
        with fs.open(path, "rb") as f:
            names = [s["shard"] for s in json.loads(f.read()).get("shards", [])]
    else:
        names = [shard_name(i) for i in list_indexes(data_dir)]
    if not names:
        raise FileNotFoundError(f"no complete shards in {data_dir!r} (no dataset.json and no NNNNNN.json index)")
    return [join(data_dir, n) for n in names]


def _count_tar_error(exn: Exception) -> bool:
    """webdataset handler: count a tar-level error and continue with the next shard/member."""
    STATS.skip("corrupt_tar", repr(exn))
    return True


def fsspec_opener(shards):
    """Pipeline stage: ``{"url": ...}`` -> ``{"url", "stream"}`` opened through fsspec; a failure is counted."""
    import fsspec

    for shard in shards:
        try:
            stream = fsspec.open(shard["url"], "rb").open()
        except OSError as err:
            STATS.skip("unreadable_shard", f"{shard['url']}: {err}")
            continue
        yield dict(shard, stream=stream)


def decode_records(samples, stats: ReadStats | None = None):
    """Pipeline stage: raw WebDataset samples -> Records; corrupt ones skipped and counted."""
    stats = stats or STATS
    for sample in samples:
        try:
            rec = record.decode_sample(sample)
        except record.BadRecord as err:
            stats.skip(err.reason, str(err))
            continue
        stats.samples += 1
        yield rec


def record_pipeline(urls: list[str], *, shuffle_buffer: int = 0, seed: int = 0, decode: bool = True,
                    resampled: bool = False):
    """A ``webdataset.DataPipeline`` over ``urls`` split by node and worker, optionally shuffled.

    ``resampled``: draw shards with replacement forever (webdataset's ``ResampledShards``, deterministic:
    seeded by ``seed``, the rank and the DataLoader worker); the caller sets the epoch length.
    """
    from functools import partial

    import webdataset as wds
    from webdataset import tariterators

    sources = [wds.ResampledShards(urls, seed=seed, deterministic=True)] if resampled else [wds.SimpleShardList(urls), wds.split_by_node,
                                                                 wds.split_by_worker]
    stages = [
        *sources,
        fsspec_opener,  # local paths and bucket URLs (gs://, s3://) alike
        partial(tariterators.tar_file_expander, handler=_count_tar_error),
        partial(tariterators.group_by_keys, handler=_count_tar_error),
    ]
    if shuffle_buffer > 0:
        import random

        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed)))
    if decode:
        stages.append(decode_records)
    return wds.DataPipeline(*stages)



def _rows_for(meta: dict, recipe, seed: int, epoch: int, key: str) -> tuple[int, int | None]:
    """(row of the recorded trajectory to train on, row of its step-distillation target or None)."""
    from students.objective import choose_row

    recorded = meta["recorded_steps"]
    if recipe.step_weight > 0:
        if recorded != list(range(meta["num_inference_steps"])):
            raise ValueError("step distillation needs every teacher step recorded (dump with --record_steps all)")
        k = max(1, len(recorded) // recipe.student_steps)  # teacher steps per student step
        candidates = [r for r in range(0, len(recorded), k) if r + k <= len(recorded)]
        row = choose_row(key, seed, epoch, candidates)
        return row, row + k
    if recipe.feature_weights:
        return recorded.index(choose_row(key, seed, epoch, meta["feature_steps"])), None
    return choose_row(key, seed, epoch, list(range(len(recorded)))), None


def training_batch(records, negative_prompt_embeds, recipe, *, seed: int, epoch: int, final_alpha_cumprod: float,
                   with_images: bool = False) -> dict:
    """Records -> a float32 batch for ``students.objective.compute_losses`` (offline targets included)."""
    import numpy as np
    import torch

    cols: dict[str, list] = {k: [] for k in ("keys", "z", "t", "cond", "x0", "guidance", "pred_cond", "pred_uncond",
                                             "z_next", "t_next")}
    feats: dict[str, list] = {name: [] for name, _ in recipe.feature_weights}
    for rec in records:
        meta = rec.meta
        row, nxt = _rows_for(meta, recipe, seed, epoch, rec.key)
        step = meta["recorded_steps"][row]
        cols["keys"].append(rec.key)
        cols["z"].append(rec.latents[row])
        cols["t"].append(meta["timesteps"][step])
        cols["cond"].append(rec.prompt_embeds)
        cols["x0"].append(rec.latents[-1])
        cols["guidance"].append(meta["guidance_scale"])
        cols["pred_cond"].append(rec.pred_cond[row])
        cols["pred_uncond"].append(rec.pred_uncond[row])
        if nxt is not None:
            cols["z_next"].append(rec.latents[nxt])
            cols["t_next"].append(meta["timesteps"][meta["recorded_steps"][nxt]] if nxt < len(meta["recorded_steps"]) else -1)
        for name in feats:
            feats[name].append(rec.feats[name][meta["feature_steps"].index(step)])
    f32 = lambda xs: torch.from_numpy(np.stack(xs).astype(np.float32))  # noqa: E731
    if not isinstance(negative_prompt_embeds, dict):
        negative_prompt_embeds = {"negative_prompt_embeds": negative_prompt_embeds}
    expand = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None].expand(len(records), *np.shape(a))  # noqa: E731
    batch = {"keys": cols["keys"], "z": f32(cols["z"]), "t": torch.tensor(cols["t"]), "cond": f32(cols["cond"]),
             "x0": f32(cols["x0"]), "guidance": torch.tensor(cols["guidance"], dtype=torch.float32),
             "uncond": expand(negative_prompt_embeds["negative_prompt_embeds"]),
             "final_alpha_cumprod": torch.tensor(final_alpha_cumprod, dtype=torch.float32)}
    if "pooled_prompt_embeds" in records[0].arrays:  # SDXL-style conditioning: pooled text embeds and time ids
        time_ids = f32([rec.add_time_ids for rec in records])
        batch["added"] = {"text_embeds": f32([rec.pooled_prompt_embeds for rec in records]), "time_ids": time_ids}
        batch["added_uncond"] = {"text_embeds": expand(negative_prompt_embeds["negative_pooled_prompt_embeds"]),
                                 "time_ids": time_ids}
    targets = {"pred_cond": f32(cols["pred_cond"]), "pred_uncond": f32(cols["pred_uncond"]),
               "feats": {k: f32(v) for k, v in feats.items()}}
    if cols["z_next"]:
        batch["z_next"], batch["t_next"] = f32(cols["z_next"]), torch.tensor(cols["t_next"])
    if with_images:  # the teacher decoder's images, (B, 3, H, W) in [-1, 1]
        batch["image"] = torch.stack([_png_to_tensor(rec) for rec in records])
    return {"batch": batch, "targets": targets}


def read_dataset(data_dir: str):
    """(dataset.json as a dict, {name: array} of what is stored once: the unconditional embeddings), through fsspec."""
    import numpy as np

    fs, path = url_to_fs(join(data_dir, "dataset.json"))
    if not fs.exists(path):
        raise FileNotFoundError(f"{data_dir!r} has no dataset.json: not a finished dump")
    with fs.open(path, "rb") as f:
        dataset = json.loads(f.read())
    negative = {}
    for name, file in dataset["shared"].items():  # negative_prompt_embeds (+ negative_pooled_prompt_embeds: SDXL)
        with fs.open(url_to_fs(join(data_dir, file))[1], "rb") as f:
            negative[name] = record.load_npy(f.read()).astype(np.float32)
    return dataset, negative


def _png_to_tensor(rec):
    import io

    import numpy as np
    import torch
    from PIL import Image

    if rec.image_png is None:
        raise ValueError(f"sample {rec.key!r} has no image: decoder distillation needs a dump made with --save_images")
    image = np.asarray(Image.open(io.BytesIO(rec.image_png)).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(image).permute(2, 0, 1)
