"""The Beam jobs: ``curate`` (captions and images -> manifest), ``dump`` (teacher -> shards) and
``filter`` (scored dump -> final shards), one package each, plus what they share (``common``,
``stages``, ``dedup``, ``records``, ``scoring``, ``plots``). ``teacher_dump.py`` and
``filter_shards.py`` are the documented entry points of the dump and filter jobs.
"""

from core.errors import quiet_known_warnings

# Every job's entry point (``beam run``, ``python -m pipelines.<job>``, ``distill <job>``) imports this
# package before Beam: Beam's import-time "apitools not found" warning must not precede a one-line error.
quiet_known_warnings()
