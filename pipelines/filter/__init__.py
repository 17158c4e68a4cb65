"""The filter job (``pipelines.filter.job``): its plan (``plan``), copy work unit (``shard``) and report.

    python -m pipelines.filter ...   |   beam run pipelines/filter_shards.py ...   |   distill filter ...
"""

from pipelines.filter.job import FilterConfig, main, run

__all__ = ["FilterConfig", "main", "run"]
