"""The training loop (``train``), its command (``cli``; ``python -m students.training``), checkpoints
(``checkpoint``), image grids (``grid``), progressive rounds over the loop (``rounds``) and reading a run
folder back (``runs``)."""
