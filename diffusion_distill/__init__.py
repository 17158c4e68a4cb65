"""diffusion-distill: command-line entry points (``distill`` and ``beam``) and bundled data.

The libraries live in the top-level packages ``teachers``, ``filters``, ``students`` and
``pipelines``; this package only dispatches to them.
"""

from pathlib import Path

__version__ = "0.1.0"

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_PROMPTS = DATA_DIR / "prompts.txt"
