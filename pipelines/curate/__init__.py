"""The curate job (``pipelines.curate.job``) and its stages: sources, rules, images, models, sinks, report.

    python -m pipelines.curate ...   |   beam run pipelines/curate.py ...   |   distill curate ...
"""

from pipelines.curate.job import Curate, CurateOptions, DownloadImages, main, parse_options, run

__all__ = ["Curate", "CurateOptions", "DownloadImages", "main", "parse_options", "run"]
