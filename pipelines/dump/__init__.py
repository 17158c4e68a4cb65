"""The teacher dump job (``pipelines.dump.job``): its plan (``plan``) and shard work unit (``shard``).

    python -m pipelines.dump ...   |   beam run pipelines/teacher_dump.py ...   |   distill dump ...
"""

from pipelines.dump.job import DumpConfig, main, run

__all__ = ["DumpConfig", "main", "run"]
