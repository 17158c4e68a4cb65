"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) as rounds of the trainer.

    distill train --data out/dump --output runs/prog --recipe progressive --progressive_from 40 --student_steps 10

Each round halves the student's sampling steps: 40 -> 20 -> 10 here. Round 1 trains a 20-step student
on the dump (its target, two recorded teacher steps later, is two DDIM steps of the teacher when the
dump's sampler is DDIM; with ``--online_teacher`` the teacher computes them). Every later round starts
its student from the previous round's weights and uses the previous round's student, online beside
it, as the teacher: for a student step t -> t'' the target x~ is the x whose one DDIM step lands where
the teacher's two DDIM steps t -> t' -> t'' land (``students.distill.losses.progressive_target``). Round N's
run folder is ``OUTPUT/round-NN`` (NN = its student's steps); each exports like any run.
"""

from __future__ import annotations

import torch

from core.errors import UserError
from students.distill import losses as D


def rounds(from_steps: int, to_steps: int) -> list[int]:
    """The student step counts of the rounds: from_steps/2, from_steps/4, ..., to_steps."""
    steps, out = from_steps, []
    while steps > to_steps and steps % 2 == 0:
        steps //= 2
        out.append(steps)
    if not out or out[-1] != to_steps:
        raise UserError(f"--progressive_from {from_steps} does not halve down to --student_steps {to_steps} "
                        f"(it must be {to_steps} times a power of two, at least twice)")
    return out


def check_round(teacher_steps: int, student_steps: int) -> None:
    """A round needs an even number of recorded steps per student step (its teacher's midpoint t')."""
    if teacher_steps % student_steps or (teacher_steps // student_steps) % 2:
        raise UserError(f"progressive round: {teacher_steps} recorded steps are not an even multiple of "
                        f"--student_steps {student_steps}; the teacher's midpoint t' is not on the recorded grid")


def midpoint_levels(records, recipe, *, seed: int, epoch: int, scheduler_config: dict) -> dict:
    """(t', alpha', sigma') of each sample's teacher midpoint: row r + k/2 of its jump r -> r + k."""
    from shards.loader import noise_levels
    from students.distill.batches import rows_for

    cols = {"t_mid": [], "alpha_mid": [], "sigma_mid": []}
    for rec in records:
        row, nxt = rows_for(rec.meta, recipe, seed, epoch, rec.key)
        timesteps, alphas, sigmas = noise_levels(rec.meta, scheduler_config)
        mid = row + (nxt - row) // 2
        for k, v in zip(cols, (timesteps[mid], alphas[mid], sigmas[mid])):
            cols[k].append(float(v))
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in cols.items()}


@torch.no_grad()
def teacher_z_next(teacher_unet, batch: dict, mids: dict, prediction_type: str) -> torch.Tensor:
    """z_t'' after two guided DDIM steps of ``teacher_unet`` from the batch's (z, t) via its midpoint."""
    cond, uncond, w = batch["cond"], batch["uncond"], batch["guidance"]

    def teacher_x0(z, t, alpha, sigma):
        out = teacher_unet(torch.cat([z, z]), t.repeat(2), encoder_hidden_states=torch.cat([uncond, cond])).sample
        pred_uncond, pred_cond = out.chunk(2)
        return D.pred_to_x0(D.guidance_combine(pred_cond, pred_uncond, w), z, alpha, sigma, prediction_type)

    dev = batch["z"].device
    return D.two_step_landing(teacher_x0, batch["z"], batch["t"], batch["alpha"], batch["sigma"],
                              mids["t_mid"].to(dev), mids["alpha_mid"].to(dev), mids["sigma_mid"].to(dev),
                              batch["alpha_next"], batch["sigma_next"])


