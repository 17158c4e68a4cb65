"""``distill train`` (and ``python -m students.training``): flags -> ``TrainConfig`` -> ``train`` or, with
``--progressive_from``, the progressive rounds over it (``students.training.rounds``).

    distill train --data out/dump --output runs/s1 --recipe snapfusion_step --student_steps 8
"""

from __future__ import annotations

import sys

import torch

from core.errors import run_main
from core.options import parse
from students.training.train import TrainConfig, train


DESCRIPTION = ("Distil a student from a dataset of shards (a dump or a filtered dump); with --progressive_from, "
               "the progressive rounds.")


def parse_args(argv: list[str] | None) -> TrainConfig:
    return parse(TrainConfig, argv, prog="distill train", description=DESCRIPTION)[0]


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    try:
        if cfg.progressive_from:
            from students.training.rounds import run_rounds

            run_rounds(cfg)
        else:
            train(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("distill train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
