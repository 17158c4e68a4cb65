"""A distilled student exported by ``distill export`` is the next stage's teacher (SnapFusion's chain):
it loads through ``teachers.load.load_teacher``, dumps with its own step count, and teaches online."""

import json
import os

import pytest
import torch


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conftest import run_dump
    from students.export import folder as export
    from students.training.train import TrainConfig, train

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("chain")
    dump = run_dump(tmp, ["a red circle on a white background", "a blue square on a grey background"],
                    samples_per_shard=2, batch_size=2, feature_layers=None, cpu_threads=1)  # tmp/p.txt -> tmp/out
    train(TrainConfig(data=dump, output=str(tmp / "run"), recipe="snapfusion_step", student_steps=2,
                      max_steps=2, batch_size=2, ema_decay=0.0))
    folder = export.export(str(tmp / "run"), str(tmp / "student"), weights="raw")
    return tmp, folder


def test_an_exported_student_loads_as_a_teacher_with_its_own_steps(exported):
    from students.export.folder import read_inference
    from teachers.load import load_teacher, teacher_geometry, teacher_lineage

    tmp, folder = exported
    teacher = load_teacher(folder)
    info = read_inference(folder)
    assert type(teacher.unet).__name__ == "EfficientUNet2DConditionModel" and not teacher.is_xl
    assert info["num_inference_steps"] == 2
    assert teacher_geometry(folder)["levels"] == len(teacher.unet.config.block_out_channels)
    assert teacher_lineage(folder) == {"folder": os.path.abspath(folder), "inference": info}
    assert teacher_lineage("tiny") is None and teacher_lineage(str(tmp / "out")) is None


def test_a_dump_made_with_an_exported_student(exported):
    from conftest import dump_argv
    from pipelines import teacher_dump
    from shards.loader import dataset_shards, record_pipeline
    from students.export.folder import read_inference
    from teachers.load import load_teacher

    tmp, folder = exported
    info = read_inference(folder)
    teacher_dump.run(dump_argv(tmp / "p.txt", tmp / "dump2", teacher=folder, num_inference_steps=info["num_inference_steps"],
                               samples_per_shard=2, batch_size=2, feature_layers=None, cpu_threads=1))
    dataset = json.loads((tmp / "dump2" / "dataset.json").read_text())
    assert dataset["recipe"]["teacher"] == folder and dataset["totals"]["samples_written"] == 2
    scheduler = load_teacher(folder).pipe.scheduler
    scheduler.set_timesteps(info["num_inference_steps"])
    assert [round(t) for t in dataset["timesteps"]] == scheduler.timesteps.tolist()  # the folder's own sampler
    records = list(record_pipeline(dataset_shards(str(tmp / "dump2"))))
    assert len(records) == 2 and all(r.latents.shape[0] == 3 for r in records)  # 2 steps: 2 inputs + the final latent


def test_the_exported_scheduler_samples_at_the_trained_timesteps(exported):
    from students.export.folder import read_inference
    from teachers.load import load_teacher

    tmp, folder = exported
    info = read_inference(folder)
    scheduler = load_teacher(folder).pipe.scheduler
    scheduler.set_timesteps(info["num_inference_steps"])
    assert scheduler.timesteps.tolist() == info["timesteps"]


def test_the_dump_records_the_students_lineage(exported):
    from teachers.load import teacher_lineage

    tmp, folder = exported
    dataset = json.loads((tmp / "dump2" / "dataset.json").read_text())
    assert dataset["teacher_lineage"] == teacher_lineage(folder)


def test_an_exported_student_teaches_online(exported):
    from students.training.train import TrainConfig, train

    tmp, folder = exported
    losses = train(TrainConfig(data=str(tmp / "out"), output=str(tmp / "run_online"), recipe="output_kd",
                               max_steps=2, batch_size=2, ema_decay=0.0, online_teacher=folder))
    assert len(losses) == 2 and all(l == l and l > 0 for l in losses)
