"""The documented entry point of the teacher dump job; the job itself is ``pipelines/dump/``.

    beam run pipelines/teacher_dump.py --prompts prompts.txt --output out/dump --teacher tiny
    python -m pipelines.teacher_dump ...   |   distill dump ...
"""

import sys

from core.options import beam_options
from pipelines.dump.job import DumpConfig, main, run, write_dataset  # noqa: F401 (this module's interface)

# The job's flags as Beam PipelineOptions, for code that reads them from a launcher's argv.
TeacherDumpOptions = beam_options(DumpConfig)

if __name__ == "__main__":
    sys.exit(main())
