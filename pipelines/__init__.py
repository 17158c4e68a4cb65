"""The Beam jobs: ``curate`` (captions and images -> manifest), ``dump`` (teacher -> shards) and
``filter`` (scored dump -> final shards), one package each, plus what they share (``common``,
``stages``, ``dedup``, ``records``, ``scoring``, ``plots``). ``teacher_dump.py`` and
``filter_shards.py`` are the documented entry points of the dump and filter jobs.
"""
