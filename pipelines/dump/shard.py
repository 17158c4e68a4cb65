"""Generating one shard of the teacher dump (the body of the Beam work unit, free of Beam).

Reads the shard's rows from the plan, samples them in batches across prompts, encodes each result
with the record schema, and writes the shard atomically with its index. A sample whose teacher
output is NaN/Inf (or that cannot be encoded) goes to ``rejects/NNNNNN.jsonl`` with its reason;
the rejects file is written before the shard is committed, so a complete shard always has one.

With a scorer (``--score_images``) each batch's decoded images are scored right after decoding,
while they are in memory: the scores go into the sample's json and the shard index, the CLIP
image embedding into the shard's ``NNNNNN.emb.npy`` (``shards.writer``), so the filter job
(``pipelines/filter``) never decodes an image.
"""

from __future__ import annotations

from filters import reasons
from pipelines.common import work_unit, write_rejects
from shards import record
from core.fs import url_to_fs
from shards.writer import ShardWriter
from core.fs import atomic_write_bytes, join

_CLIP_MAX_TOKENS = 77  # SD's CLIP length; a teacher's tokenizer may take fewer (shapes-sd3: 16)


def _write_shared(output: str, info) -> dict:
    """Arrays the same for every sample (the unconditional embeddings), stored once per dataset."""
    import numpy as np

    shared = {"negative_prompt_embeds": "negative_prompt_embeds.npy"}
    arrays = {"negative_prompt_embeds": info.negative_prompt_embeds}
    if info.negative_pooled_prompt_embeds is not None:
        shared["negative_pooled_prompt_embeds"] = "negative_pooled_prompt_embeds.npy"
        arrays["negative_pooled_prompt_embeds"] = info.negative_pooled_prompt_embeds
    fs, root = url_to_fs(output)
    for name, array in arrays.items():
        if not fs.exists(join(root, shared[name])):  # every shard computes the same bytes; first one writes
            atomic_write_bytes(join(output, shared[name]), record.npy_bytes(array.astype(np.float32)))
    return shared


def _index_scores(image_scores: dict | None) -> dict | None:
    """The per-key numbers the shard index holds (the model name is in the recipe)."""
    if image_scores is None:
        return None
    return {"aesthetic_score": image_scores["aesthetic_score"], "clip_score": image_scores["clip_score"]}


def _score(scorer, results) -> list:
    """Per result: (image_scores dict, CLIP image embedding), or (None, None) without a scorer."""
    from filters.image_scores import score_images

    if scorer is None:
        return [(None, None)] * len(results)
    scores = score_images(scorer, [r.image for r in results], [r.prompt for r in results])
    return [(scores.row(i, scorer.clip_model), scores.image_embeds[i]) for i in range(len(results))]


def _check_scores(image_scores: dict | None, embedding) -> None:
    import numpy as np

    if image_scores is None:
        return
    values = [v for v in (image_scores["clip_score"], image_scores["aesthetic_score"]) if v is not None]
    if not (np.isfinite(embedding).all() and np.isfinite(values).all()):
        raise record.BadRecord(reasons.NON_FINITE_SCORE, "CLIP image embedding or score is NaN/Inf")


def generate_shard(teacher, config, recipe, output: str, shard: int, *, progress=None, scorer=None) -> dict:
    """Write shard ``shard`` from the plan; returns its index. ``progress``: the run's overall counter
    (``pipelines.common.shard_progress``) or None."""
    from teachers.sampler import SampleRequest, sample_trajectories

    rejects, truncated, fallbacks, info = [], 0, 0, None
    with work_unit(output, shard, progress) as (rows, bar):
        requests = [SampleRequest(r["key"], r["caption"], int(r["seed"]), r["guidance_scale"], r.get("image"))
                    for r in rows]
        batches = [requests[i : i + recipe.batch_size] for i in range(0, len(requests), recipe.batch_size)]
        with ShardWriter(output, shard, recipe_hash=recipe.hash) as writer:
            for batch in batches:
                results, info = sample_trajectories(teacher, batch, config)
                clip_tokens = getattr(teacher.pipe.tokenizer, "model_max_length", _CLIP_MAX_TOKENS)
                meta = dict(teacher=recipe.teacher, dtype=recipe.dtype, scheduler_class=info.scheduler_class,
                            scheduler_config=info.scheduler_config, prediction_type=info.prediction_type,
                            num_inference_steps=recipe.sampler.num_inference_steps, timesteps=info.timesteps,
                            recorded_steps=info.recorded_steps, feature_layers=list(recipe.sampler.feature_layers),
                            height=recipe.sampler.height, width=recipe.sampler.width, recipe_hash=recipe.hash)
                for res, (image_scores, embedding) in zip(results, _score(scorer, results)):
                    try:
                        sample, stats = record.encode_sample(res, meta, storage_dtype=recipe.storage_dtype,
                                                             image_scores=image_scores)
                        _check_scores(image_scores, embedding)
                    except record.BadRecord as err:
                        rejects.append({"key": res.key, "reason": err.reason, "detail": str(err), "caption": res.prompt})
                        continue
                    truncated += res.num_tokens > clip_tokens
                    fallbacks += len(stats["fp32_fallback"])
                    writer.write(sample, scores=_index_scores(image_scores), embedding=embedding)
                if bar is not None:
                    bar.update(len(batch))
            counts = write_rejects(output, f"{shard:06d}", rejects)
            writer.extra = dict(
                rejects=counts, truncated_captions=int(truncated), fp32_fallbacks=fallbacks,
                shared=_write_shared(output, info) if info is not None else {},
                timesteps=info.timesteps if info else None, recorded_steps=info.recorded_steps if info else None,
                scheduler_class=info.scheduler_class if info else None,
                scheduler_config=info.scheduler_config if info else None,
                prediction_type=info.prediction_type if info else None,
            )
    return writer.index
