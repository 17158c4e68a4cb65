"""Architecture search (SnapFusion Algorithm 1): the evolution loop (``evolve``; ``distill evolve``) and its
in-place checkpoint edits (``edit``). Latency comes from ``students.cost.lookup``."""
