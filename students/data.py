"""Reading distillation shards: a WebDataset pipeline that yields decoded ``teachers.record.Record``s.

    from students.data import dataset_shards, record_pipeline
    pipeline = record_pipeline(dataset_shards("out/dump"))
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)

Shards are split by node (``torch.distributed`` rank) and then by DataLoader worker, so every
sample is read exactly once per epoch across all ranks and workers. Decoding goes through the
schema module only. A corrupt sample is skipped, counted in ``ReadStats`` and logged at a limited
rate; it never stops the reader and never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from teachers import record
from teachers.shards import _fs, join, list_indexes, shard_name

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReadStats:
    """Per-process counters (each DataLoader worker holds its own copy)."""

    samples: int = 0
    skipped: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    _last_log: float = 0.0

    def skip(self, reason: str, detail: str, min_interval_s: float = 10.0) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_log >= min_interval_s:  # rate-limited: a bad shard must not flood the log
            log.warning("skipped corrupt sample (%s): %s [%d skipped so far]", reason, detail, self.skipped)
            self._last_log = now


STATS = ReadStats()


def dataset_shards(data_dir: str) -> list[str]:
    """Paths/URLs of a dataset's complete shards: those listed in ``dataset.json``, else those with an index."""
    fs, path = _fs(join(data_dir, "dataset.json"))
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            names = [s["shard"] for s in json.loads(f.read()).get("shards", [])]
    else:
        names = [shard_name(i) for i in list_indexes(data_dir)]
    if not names:
        raise FileNotFoundError(f"no complete shards in {data_dir!r} (no dataset.json and no NNNNNN.json index)")
    return [join(data_dir, n) if "://" in data_dir else os.path.join(data_dir, n) for n in names]


def _count_tar_error(exn: Exception) -> bool:
    """webdataset handler: count a tar-level error and continue with the next shard/member."""
    STATS.skip("corrupt_tar", repr(exn))
    return True


def decode_records(samples, stats: ReadStats | None = None):
    """Pipeline stage: raw WebDataset samples -> Records; corrupt ones skipped and counted."""
    stats = stats or STATS
    for sample in samples:
        try:
            rec = record.decode_sample(sample)
        except record.BadRecord as err:
            stats.skip(err.reason, str(err))
            continue
        stats.samples += 1
        yield rec


def record_pipeline(urls: list[str], *, shuffle_buffer: int = 0, seed: int = 0, decode: bool = True):
    """A ``webdataset.DataPipeline`` over ``urls`` split by node and worker, optionally shuffled."""
    import webdataset as wds

    stages = [
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=_count_tar_error),
    ]
    if shuffle_buffer > 0:
        import random

        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed)))
    if decode:
        stages.append(decode_records)
    return wds.DataPipeline(*stages)

