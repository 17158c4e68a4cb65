"""``python -m students.training ...``: the same as ``distill train ...``."""

import sys

from students.training.cli import main

sys.exit(main())
