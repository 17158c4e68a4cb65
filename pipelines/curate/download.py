"""Download stage of the curate job: img2dataset over a batch of records' URLs.

Each batch becomes one img2dataset run writing webdataset shards to
``OUTPUT/images/<batch hash>/`` (``00000.tar`` + ``00000.parquet`` + ``00000_stats.json``): the
images stay on disk beside the manifest, in a format later jobs read with stock tools, and a
re-run finds the finished batch (img2dataset's incremental mode) instead of fetching it again.

img2dataset reports every URL in its per-shard parquet with ``status`` (``success``,
``failed_to_download``, ``failed_to_resize``) and ``error_message``. Successful records get an
``image_ref`` into the tar; the others become rejects (``download_failed``, detail
``"<status>: <error_message>"``) and a ``download_<status>`` counter each, so none is lost.

img2dataset runs in a child process: it installs a SIGINT handler (only allowed in a main thread,
which a Beam worker's bundle thread is not) and starts its own process pool and logger process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from filters import reasons
from filters.config import CurateConfig
from pipelines.curate.schema import reject_row

_DRIVER = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"


def batch_folder(images_dir: str, keys: list[str]) -> str:
    """Deterministic folder of a batch: the same records land in the same place on a re-run."""
    digest = hashlib.sha1("\n".join(sorted(keys)).encode("utf-8")).hexdigest()[:16]
    return os.path.join(images_dir, digest)


def run_img2dataset(rows: list[dict], folder: str, cfg: CurateConfig) -> None:
    """Download ``rows`` ({record_key, url, caption}) into ``folder`` as webdataset shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="dd-curate-urls-") as tmp:
        url_list = os.path.join(tmp, "urls.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
            [("record_key", pa.string()), ("url", pa.string()), ("caption", pa.string())])), url_list)
        kwargs = dict(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
                      save_additional_columns=["record_key"], output_format="webdataset", output_folder=folder,
                      processes_count=1, thread_count=cfg.download_threads, timeout=cfg.download_timeout,
                      image_size=cfg.download_image_size, resize_mode="keep_ratio", retries=0,
                      number_sample_per_shard=max(len(rows), 1), enable_wandb=False, distributor="multiprocessing")
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")  # albumentations pings the network on import
        proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(kwargs)], env=env, cwd=tmp,
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed on {folder} (exit {proc.returncode}): {proc.stderr[-2000:]}")


def read_results(folder: str) -> dict[str, dict]:
    """record key -> img2dataset's row (status, error_message, key, original sizes) plus ``image_ref``."""
    import pyarrow.parquet as pq

    results: dict[str, dict] = {}
    for meta in FileSystems.match([os.path.join(folder, "*.parquet")])[0].metadata_list:
        with FileSystems.open(meta.path) as f:
            table = pq.read_table(f)
        tar_path = meta.path[: -len(".parquet")] + ".tar"
        offsets = _image_offsets(tar_path) if FileSystems.exists(tar_path) else {}
        for row in table.to_pylist():
            ref = offsets.get(row["key"]) if row["status"] == "success" else None
            results[row["record_key"]] = {**row, "image_ref": ref}
    return results


def _image_offsets(tar_path: str) -> dict[str, dict]:
    refs = {}
    with FileSystems.open(tar_path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            if ext in ("jpg", "jpeg", "png", "webp"):
                refs[key] = {"path": tar_path, "offset": member.offset_data, "size": member.size}
    return refs


class DownloadBatch(beam.DoFn):
    """list[record] -> records with ``image_ref``; failures to the ``rejects`` output with status."""

    def __init__(self, images_dir: str, cfg: CurateConfig):
        self.images_dir = images_dir
        self.cfg = cfg

    def process(self, batch):
        folder = batch_folder(self.images_dir, [r["key"] for r in batch])
        rows = [{"record_key": r["key"], "url": r["url"], "caption": r["caption"]} for r in batch]
        run_img2dataset(rows, folder, self.cfg)
        results = read_results(folder)
        for record in batch:
            res = results.get(record["key"])
            status = "missing" if res is None else res["status"]
            Metrics.counter("curate", f"download_{status}").inc()
            if res is not None and res["image_ref"] is not None:
                yield {**record, "image_ref": res["image_ref"],
                       "width": res.get("original_width") or record["width"],
                       "height": res.get("original_height") or record["height"]}
                continue
            detail = f"{status}: {None if res is None else res.get('error_message')}"
            Metrics.counter("curate", f"rejected_{reasons.DOWNLOAD_FAILED}").inc()
            yield beam.pvalue.TaggedOutput("rejects", reject_row(record, "download", reasons.DOWNLOAD_FAILED, detail))
