"""Progressive distillation's rounds (Salimans & Ho 2022, Algorithm 2) over the training loop: each
round trains a student of half the previous round's steps with the previous round's student as its
online teacher. The per-step maths is in ``students.distill.progressive``; this module only chains
``students.training.train.train`` runs in ``OUTPUT/round-NN``.
"""

from __future__ import annotations

import dataclasses

from students.distill.progressive import rounds


def run_rounds(cfg) -> list[str]:
    """Train every round of ``cfg`` (a TrainConfig with ``progressive_from``); -> the rounds' run folders."""
    from students.training import checkpoint as ckpt
    from students.training.runs import load_student_unet
    from students.training.train import check_inputs, train
    from students.models.unet import EfficientUNet2DConditionModel
    from core.fs import join

    check_inputs(cfg, cfg.resolved_recipe())  # every round's step counts fit the dump, before round 1 starts
    folders, previous = [], None
    for n in rounds(cfg.progressive_from, cfg.student_steps):
        round_cfg = dataclasses.replace(cfg, output=join(cfg.output, f"round-{n:02d}"), student_steps=n,
                                        progressive_from=0, recipe="progressive")
        student = None
        if previous is not None:  # Algorithm 2: the student starts as a copy of its teacher
            student = EfficientUNet2DConditionModel.from_config(previous.config)
            student.load_state_dict(previous.state_dict())
        train(round_cfg, teacher_unet=previous, student=student)
        folders.append(round_cfg.output)
        last = ckpt.checkpoints(round_cfg.output)[-1]
        previous = load_student_unet(last, weights="ema" if cfg.ema_decay > 0 else "raw").requires_grad_(False).eval()
    return folders
