"""The dump recipe (shards.recipe): the sampler settings nested once, the flat JSON and its hash unchanged,
older dataset.json recipes read typed."""

import dataclasses
import json

import pytest

from core.errors import UserError
from shards import loader, schema
from shards.recipe import DumpRecipe, SamplerConfig
from shards.record import SCHEMA_VERSION

FLAT = dict(teacher="tiny", dtype="float32", device="cpu", scheduler="ddim", num_inference_steps=4, guidance_scale=7.5,
            guidance_range=[2.0, 14.0], height=32, width=32, record_steps=[0, 2], feature_layers=["mid_block", "up_blocks.0"],
            num_feature_steps=1, save_images=True, storage_dtype="float16", seeds_per_prompt=1, samples_per_shard=8,
            batch_size=4, cpu_threads=1, input_sha256="ab" * 32, schema_version=3)
SCORING = dict(preset="tiny", clip_model="dd-tiny-clip", clip_weights="random", aesthetic_weights=None, embed_dim=32)


def test_the_recipe_holds_its_sampler_settings_once_and_hashes_as_the_flat_recipe_did():
    recipe = DumpRecipe.from_json(FLAT)
    assert recipe.sampler == SamplerConfig(num_inference_steps=4, scheduler="ddim", guidance_scale=7.5,
                                           guidance_range=(2.0, 14.0), height=32, width=32, record_steps=(0, 2),
                                           feature_layers=("mid_block", "up_blocks.0"), num_feature_steps=1,
                                           save_images=True)
    assert json.loads(json.dumps(recipe.to_json())) == FLAT  # the same flat JSON: no eta, real or score fields
    assert recipe.hash == "e1eb13bb72372c70"  # the hash of this recipe before the sampler was nested
    scored = DumpRecipe.from_json({**FLAT, "guidance_range": None, "record_steps": None, "score_images": SCORING,
                                   "real_images": True})
    assert scored.sampler.real_images and scored.score_images == SCORING and scored.hash == "aebdeafe4bb5fdf2"
    assert DumpRecipe.from_json(json.loads(json.dumps(scored.to_json()))) == scored


def test_unknown_fields_are_kept_and_a_bad_sampler_setting_is_refused():
    recipe = DumpRecipe.from_json({**FLAT, "future_knob": 3, "eta": 0.5})
    assert recipe.extra == {"future_knob": 3} and recipe.sampler.eta == 0.5
    assert recipe.to_json()["future_knob"] == 3 and recipe.to_json()["eta"] == 0.5
    with pytest.raises(UserError, match="record_steps"):
        DumpRecipe.from_json({**FLAT, "record_steps": [7]})


def test_a_schema_2_dataset_json_reads_typed(tmp_path):
    """Schema 2 recorded the same flat recipe, before score_images and real_images existed: both read as off."""
    recorded = dict(FLAT, schema_version=2, record_steps=None, guidance_range=None)
    info = {"schema_version": 2, "recipe": recorded, "recipe_hash": DumpRecipe.from_json(recorded).hash,
            "shards": [{"shard": "000000.tar", "count": 1}], "scheduler_class": "DDIMScheduler",
            "scheduler_config": {"num_train_timesteps": 1000}, "prediction_type": "epsilon",
            "timesteps": [750.0, 500.0, 250.0, 0.0], "recorded_steps": [0, 1, 2, 3]}
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    dataset = loader.read_dataset_info(str(tmp_path))
    assert isinstance(dataset, schema.DatasetInfo) and dataset.prediction_type == "epsilon"  # the trainer's view, typed
    recipe = dataset.dump_recipe
    assert recipe.schema_version == 2 and recipe.teacher == "tiny" and recipe.cpu_threads == 1
    assert recipe.sampler.num_inference_steps == 4 and recipe.sampler.record_steps is None
    assert not recipe.sampler.real_images and recipe.score_images is None
    assert json.loads(json.dumps(recipe.to_json())) == recorded and recipe.hash == info["recipe_hash"]
    assert schema.read_dataset_info(str(tmp_path)).dump_recipe == recipe


def test_a_partial_recipe_reads_with_the_defaults_the_trainer_assumed():
    """Hand-made datasets: missing dump fields are None, sampler fields SamplerConfig's defaults, save_images True."""
    info = schema.DatasetInfo.from_dict({"schema_version": SCHEMA_VERSION, "recipe_hash": "h", "shards": [],
                                         "recipe": {"teacher": "tiny", "num_inference_steps": 4}})
    recipe = info.dump_recipe
    assert recipe.teacher == "tiny" and recipe.samples_per_shard is None
    assert recipe.sampler.height is None and recipe.sampler.feature_layers is None and recipe.sampler.save_images
    assert not recipe.sampler.real_images and DumpRecipe.from_json({}).sampler.num_inference_steps == 50


def test_the_dump_flags_take_the_sampler_defaults_from_sampler_config():
    """Each sampler setting's default is declared once, in SamplerConfig: the dump's flag of that name has it
    (``--record_steps all`` and ``--resolution`` are its None record_steps and height)."""
    from pipelines.dump.job import DumpConfig

    flags = {f.name: f.default for f in dataclasses.fields(DumpConfig)}
    sampler = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
    shared = set(flags) & set(sampler) - {"record_steps"}
    assert shared == {"num_inference_steps", "scheduler", "guidance_scale", "guidance_range", "feature_layers",
                      "num_feature_steps", "save_images", "real_images"}
    assert {n: flags[n] for n in shared} == {n: sampler[n] for n in shared}
    assert flags["resolution"] == sampler["height"] is None and flags["record_steps"] == "all"
