"""Filter job throughput against a plain ``tar`` copy of the same shards, in one invocation.

    python benchmarks/filter_throughput.py --samples 1536 --samples_per_shard 128 [--dump /tmp/ft/dump]

1. A scored dump is synthesised with the real writers (``shards.record.encode_sample``,
   ``shards.writer.ShardWriter``, ``pipelines.dump.job.write_dataset``) at SD-1.5 512 px
   geometry (an 8-step recorded trajectory, both predictions, ``mid_block`` features, a 256 px PNG:
   about 1.4 MiB per sample), so the bytes are what a real dump holds without running a teacher.
   Arrays cycle through a small pool (content does not matter to a copy); the embeddings are distinct.
2. Baseline: GNU ``tar -cf`` of each shard's members (extracted beforehand, untimed) into a new
   tar, one ``tar`` process per shard: the same bytes read and written as the filter copies.
3. The filter job (``pipelines/filter``, DirectRunner in-process) over the whole dump with
   thresholds that keep every sample, so it copies every byte. Timed whole (Beam start-up, dedup,
   plan, report and ``dataset.json`` included) and inside its copy work units (``copy_shard``).
4. The tar copy again (the machine is shared: the two tar runs show the drift).

Prints MB/s of each and the ratios filter / tar (target >= 0.5). Everything is read from the page
cache (the dump is written just before), so this measures the CPU cost per byte, not the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np


STEPS = 8  # recorded steps (the lean recipe of BENCHMARKS.md)


def _recipe(samples_per_shard: int):
    from shards.recipe import DumpRecipe, SamplerConfig

    scoring = dict(preset="tiny", clip_model="dd-tiny-clip", clip_weights="random", aesthetic_weights=None, embed_dim=32)
    sampler = SamplerConfig(num_inference_steps=STEPS, scheduler="ddim", guidance_scale=7.5, height=512, width=512,
                            feature_layers=("mid_block",), num_feature_steps=1, save_images=True)
    return DumpRecipe(teacher="synthetic-sd15", dtype="float16", device="cuda", sampler=sampler, storage_dtype="float16",
                      seeds_per_prompt=1, samples_per_shard=samples_per_shard, batch_size=8, cpu_threads=0,
                      input_sha256="0" * 64, score_images=scoring)


def _pool(rng, size: int = 8):
    from teachers.sampler import SampleResult

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    return [SampleResult(key="", prompt="", seed=0, guidance_scale=7.5, num_tokens=10, prompt_embeds=normal(77, 768),
                         noise=normal(4, 64, 64), latents=normal(STEPS + 1, 4, 64, 64), pred_cond=normal(STEPS, 4, 64, 64),
                         pred_uncond=normal(STEPS, 4, 64, 64), feature_steps=[3], feats={"mid_block": normal(1, 1280, 8, 8)},
                         image=rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(size)]


def synthesise_dump(out: str, samples: int, samples_per_shard: int) -> dict:
    """A scored dump of ``samples`` synthetic SD-1.5-sized records; returns its dataset.json."""
    import dataclasses

    from pipelines.dump.job import write_dataset
    from shards import record
    from shards.writer import ShardWriter
    from core.fs import atomic_write_bytes, join

    rng = np.random.default_rng(0)
    recipe, pool = _recipe(samples_per_shard), _pool(rng)
    timesteps = list(range(999, 0, -1000 // STEPS))[:STEPS]
    scheduler_config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                        "beta_end": 0.012, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1}
    meta = dict(teacher=recipe.teacher, dtype=recipe.dtype, scheduler_class="DDIMScheduler",
                scheduler_config=scheduler_config, prediction_type="epsilon", num_inference_steps=STEPS,
                timesteps=timesteps, recorded_steps=list(range(STEPS)), feature_layers=["mid_block"], height=512,
                width=512, recipe_hash=recipe.hash)
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(join(out, "negative_prompt_embeds.npy"), record.npy_bytes(rng.standard_normal((77, 768), np.float32)))
    indexes = []
    for shard in range(-(-samples // samples_per_shard)):
        writer = ShardWriter(out, shard, recipe_hash=recipe.hash)
        for i in range(shard * samples_per_shard, min(samples, (shard + 1) * samples_per_shard)):
            prompt = f"a synthetic prompt number {i}"
            result = dataclasses.replace(pool[i % len(pool)], key=f"p{i:07d}-s0", prompt=prompt, seed=i)
            embedding = rng.standard_normal(32).astype(np.float32)
            embedding /= np.linalg.norm(embedding)
            scores = {"clip_model": "dd-tiny-clip", "clip_score": float(rng.uniform(-0.1, 0.4)), "aesthetic_score": None}
            sample, _ = record.encode_sample(result, meta, image_scores=scores)
            writer.write(sample, scores={"aesthetic_score": None, "clip_score": scores["clip_score"]}, embedding=embedding)
        writer.extra = dict(rejects={}, truncated_captions=0, fp32_fallbacks=0,
                            shared={"negative_prompt_embeds": "negative_prompt_embeds.npy"}, timesteps=timesteps,
                            recorded_steps=list(range(STEPS)), scheduler_class="DDIMScheduler",
                            scheduler_config=scheduler_config, prediction_type="epsilon")
        indexes.append(writer.commit())
    planned = dict(prompts_in=samples, not_kept=0, prompts_rejected=0, samples_planned=samples, prompt_rejects={})
    return write_dataset(indexes, out, recipe, planned, 0)


def tar_copy(extracted: str, dest: str, members: dict[int, list[str]], fsync: bool = False) -> float:
    """Seconds for ``tar -cf`` of every shard's members (one process per shard, members in order);
    ``fsync``: each new tar is also flushed to disk, as the filter's ShardWriter does before its rename."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    os.sync()  # start from a clean page cache state: earlier phases' dirty pages are not charged here
    start = time.perf_counter()
    for shard, names in members.items():
        folder, path = os.path.join(extracted, f"{shard:06d}"), os.path.join(dest, f"{shard:06d}.tar")
        subprocess.run(["tar", "-cf", path, "-C", folder, "--", *names], check=True)
        if fsync:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - start


def extract(dump: str, extracted: str, num_shards: int) -> dict[int, list[str]]:
    shutil.rmtree(extracted, ignore_errors=True)
    members = {}
    for shard in range(num_shards):
        folder = os.path.join(extracted, f"{shard:06d}")
        os.makedirs(folder)
        with tarfile.open(os.path.join(dump, f"{shard:06d}.tar")) as tar:
            members[shard] = tar.getnames()
        subprocess.run(["tar", "-xf", os.path.join(dump, f"{shard:06d}.tar"), "-C", folder], check=True)
    return members


def run_filter(dump: str, out: str) -> tuple[float, float]:
    """(wall seconds, seconds inside the copy work units) of the filter job keeping every sample."""
    from pipelines.filter import shard as filter_copy
    from pipelines import filter_shards

    inside = [0.0]
    original = filter_copy.copy_shard

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - t

    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    filter_copy.copy_shard = timed  # CopyShardFn imports it at call time
    try:
        start = time.perf_counter()
        dataset = filter_shards.run(["--input", dump, "--output", out, "--semdedup_eps", "0", "--progress", "off"])
        wall = time.perf_counter() - start
    finally:
        filter_copy.copy_shard = original
    assert dataset["totals"]["kept"] == dataset["totals"]["input"], "the benchmark keeps every sample"
    return wall, inside[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1536)
    parser.add_argument("--samples_per_shard", type=int, default=128)
    parser.add_argument("--work", default="/tmp/filter_throughput", help="scratch folder (dump, copies)")
    args = parser.parse_args(argv)
    dump = os.path.join(args.work, f"dump-{args.samples}-{args.samples_per_shard}")
    if not os.path.exists(os.path.join(dump, "dataset.json")):  # reused across invocations: same bytes
        shutil.rmtree(dump, ignore_errors=True)
        t = time.perf_counter()
        synthesise_dump(dump, args.samples, args.samples_per_shard)
        print(f"synthesised {dump} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    from shards.schema import read_dataset_info

    dataset = read_dataset_info(dump)  # validated: the synthesised dump is a real schema-2 dataset
    num_shards, total = len(dataset.shards), sum(s["bytes"] for s in dataset.shards)
    members = extract(dump, os.path.join(args.work, "extracted"), num_shards)
    for shard in range(num_shards):  # page cache warm for both sides
        with open(os.path.join(dump, f"{shard:06d}.tar"), "rb") as f:
            while f.read(1 << 24):
                pass
    mb = total / 1e6
    extracted, copies = os.path.join(args.work, "extracted"), os.path.join(args.work, "tar-copy")
    tar1 = tar_copy(extracted, copies, members)
    tar_synced = tar_copy(extracted, copies, members, fsync=True)
    wall, inside = run_filter(dump, os.path.join(args.work, "filtered"))
    tar2 = tar_copy(extracted, copies, members)
    tar_rate = mb / ((tar1 + tar2) / 2)
    print(f"dump: {num_shards} shards, {args.samples} samples, {mb:.0f} MB ({total / args.samples / 2**20:.2f} MiB/sample)")
    print(f"tar -cf copy          : {tar1:6.2f} s, {tar2:6.2f} s -> {mb / tar1:6.1f}, {mb / tar2:6.1f} MB/s "
          f"(mean {tar_rate:.1f})")
    print(f"tar -cf + fsync       : {tar_synced:6.2f} s         -> {mb / tar_synced:6.1f} MB/s")
    for label, seconds in (("filter job, wall      ", wall), ("filter copy work units", inside)):
        print(f"{label}: {seconds:6.2f} s         -> {mb / seconds:6.1f} MB/s  ratio to tar "
              f"{mb / seconds / tar_rate:.2f}, to tar + fsync {tar_synced / seconds:.2f}")
    print(f"filter job outside the copy units (Beam start-up, scores, dedup, plan, report): {wall - inside:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
