"""The documented entry point of the filter job; the job itself is ``pipelines/filter/``.

    beam run pipelines/filter_shards.py --input out/dump --output out/final --aesthetic_threshold 5.5
    python -m pipelines.filter_shards ...   |   distill filter ...
"""

import sys

from pipelines.filter.job import FilterConfig, main, run  # noqa: F401 (this module's interface)

if __name__ == "__main__":
    sys.exit(main())
