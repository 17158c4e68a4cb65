"""The curate job's report: statistics gathered by a CombineFn, written as report.html + summary.json.

``CurateStats`` folds every manifest and reject row into counts per (status, stage, reason), a
bounded deterministic sample of scores (the rows with the smallest hash of id), cluster and
duplicate-group sizes, and a few examples per reason, so no worker holds all rows. ``write_report``
turns the result into ``OUTPUT/report.html`` (the ``core.report_html`` template; PNG plots inlined:
funnel of the stages that ran, score histograms with their thresholds, cluster sizes, each only when
it has values; example tables) and ``OUTPUT/summary.json``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter

import apache_beam as beam

from core import report_html as R
from filters import reasons

from pipelines.curate.schema import STAGES
from pipelines.curate.sinks import atomic_write
from pipelines.plots import histogram, png
from pipelines.records import effective_aesthetic, effective_clip_score

SCORE_SAMPLE = 20_000  # scores kept per histogram
STAGE_LABELS = {"read": "readable", "normalise": "caption decoded", "rules": "caption/size rules",
                "exact_dedup": "exact dedup", "download": "downloaded", "images": "image decoded + size",
                "aesthetic": "aesthetic", "clip_score": "CLIP score", "semdedup": "semantic dedup"}


def _rank(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def _example(kind: str, row: dict) -> dict:
    keys = ("key", "caption", "source", "clip_score", "aesthetic_score", "laion_aesthetic", "duplicate_of",
            "duplicate_similarity", "detail", "raw_caption")
    return {k: row.get(k) for k in keys if row.get(k) is not None}


class CurateStats(beam.CombineFn):
    """Elements: ("manifest", manifest row) or ("reject", reject row)."""

    def __init__(self, n_examples: int):
        self.n_examples = n_examples

    def create_accumulator(self):
        return {"counts": Counter(), "aesthetic": [], "clip": [], "clusters": Counter(),
                "groups": Counter(), "examples": {}}

    def add_input(self, acc, element):
        kind, row = element
        if kind == "manifest_table":
            return self.add_table(acc, row)
        if kind == "stats":  # a table's accumulator (``table_stats``)
            return self.add_accumulator(acc, row)
        rank = _rank(row["key"] or "")
        if kind == "reject":
            key, reason = (reasons.REJECTED, row["stage"], row["reason"]), row["reason"]
        else:
            reason = row["reason"] or reasons.KEPT
            key = (row["fate"], row["stage"], row["reason"])
            for name, value in (("aesthetic", effective_aesthetic(row)), ("clip", effective_clip_score(row))):
                if value is not None:
                    acc[name].append((rank, float(value)))
            if row.get("cluster_id") is not None:
                acc["clusters"][f"{row['dedup_on']}:{row['cluster_id']}"] += 1
            if row["fate"] == reasons.KEPT and row.get("n_duplicates"):
                acc["groups"][row["n_duplicates"] + 1] += 1
        acc["counts"][key] += 1
        examples = acc["examples"].setdefault(reason, [])
        examples.append((rank, row["key"] or "", _example(kind, row)))
        if len(examples) > 2 * self.n_examples + 16:
            acc["examples"][reason] = heapq.nsmallest(self.n_examples, examples, key=lambda t: t[:2])
        if len(acc["clip"]) > 2 * SCORE_SAMPLE or len(acc["aesthetic"]) > 2 * SCORE_SAMPLE:
            acc = self.compact(acc)
        return acc

    def add_table(self, acc, table):
        """A pyarrow table of manifest rows at once: the same accumulator as adding them one by one."""
        import numpy as np
        import pyarrow.compute as pc

        for item in table.group_by(["fate", "stage", "reason"]).aggregate([("key", "count")]).to_pylist():
            acc["counts"][(item["fate"], item["stage"], item["reason"])] += item["key_count"]
        keys = table.column("key").to_pylist()
        rank = np.fromiter((_rank(k or "") for k in keys), np.uint64, len(keys))
        reason = pc.fill_null(table.column("reason"), reasons.KEPT).combine_chunks().dictionary_encode()
        codes, names = reason.indices.to_numpy(zero_copy_only=False), reason.dictionary.to_pylist()
        for name, values in (("aesthetic", pc.coalesce(table.column("aesthetic_score").cast("float64"),
                                                       table.column("laion_aesthetic"))),
                             ("clip", pc.coalesce(table.column("clip_score").cast("float64"),
                                                  table.column("laion_similarity")))):
            known = np.flatnonzero(pc.is_valid(values).to_numpy(zero_copy_only=False))
            known = known[np.argsort(rank[known], kind="stable")[:SCORE_SAMPLE]]
            vals = values.take(known).to_pylist()
            acc[name] += [(int(r), float(v)) for r, v in zip(rank[known].tolist(), vals)]
        with_cluster = table.filter(pc.is_valid(table.column("cluster_id")))
        for on, cluster in zip(with_cluster.column("dedup_on").to_pylist(), with_cluster.column("cluster_id").to_pylist()):
            acc["clusters"][f"{on}:{cluster}"] += 1
        groups = table.filter(pc.and_(pc.equal(table.column("fate"), reasons.KEPT),
                                      pc.fill_null(pc.greater(table.column("n_duplicates"), 0), False)))
        for n in groups.column("n_duplicates").to_pylist():
            acc["groups"][n + 1] += 1
        for code in sorted(range(len(names)), key=names.__getitem__):  # in reason order, as np.unique gave
            value, rows = names[code], np.flatnonzero(codes == code)
            examples = acc["examples"].setdefault(value, [])
            if self.n_examples == 0:
                continue
            cut = np.partition(rank[rows], min(self.n_examples, len(rows)) - 1)[min(self.n_examples, len(rows)) - 1]
            rows = rows[rank[rows] <= cut]  # the n smallest ranks, and any ties with the n-th
            rows = np.asarray(sorted(rows.tolist(), key=lambda r: (int(rank[r]), keys[r] or ""))[:self.n_examples])
            for r, row in zip(rows.tolist(), table.take(rows).to_pylist()):
                examples.append((int(rank[r]), keys[r] or "", _example("manifest", row)))
        return self.compact(acc) if len(acc["clip"]) > 2 * SCORE_SAMPLE or len(acc["aesthetic"]) > 2 * SCORE_SAMPLE else acc

    def add_accumulator(self, acc, other):
        """``other``'s rows added to ``acc`` (compacted as ``add_input`` does): what adding them one by one gives."""
        acc["counts"].update(other["counts"])
        acc["clusters"].update(other["clusters"])
        acc["groups"].update(other["groups"])
        acc["aesthetic"] += other["aesthetic"]
        acc["clip"] += other["clip"]
        for reason, items in other["examples"].items():
            examples = acc["examples"].setdefault(reason, [])
            examples.extend(items)
            if len(examples) > 2 * self.n_examples + 16:
                acc["examples"][reason] = heapq.nsmallest(self.n_examples, examples, key=lambda t: t[:2])
        return self.compact(acc) if len(acc["clip"]) > 2 * SCORE_SAMPLE or len(acc["aesthetic"]) > 2 * SCORE_SAMPLE else acc

    def merge_accumulators(self, accumulators):
        out = self.create_accumulator()
        for acc in accumulators:
            out = self.add_accumulator(out, acc)
        return self.compact(out)

    def compact(self, acc):
        acc["aesthetic"] = heapq.nsmallest(SCORE_SAMPLE, acc["aesthetic"])
        acc["clip"] = heapq.nsmallest(SCORE_SAMPLE, acc["clip"])
        acc["examples"] = {r: heapq.nsmallest(self.n_examples, items, key=lambda t: t[:2])
                           for r, items in acc["examples"].items()}
        return acc

    def extract_output(self, acc):
        acc = self.compact(acc)
        counts = {fate: 0 for fate in reasons.FATES}
        by_reason: dict[str, dict[str, int]] = {fate: {} for fate in reasons.FATES if fate != reasons.KEPT}
        by_stage: Counter = Counter()
        for (status, stage, reason), n in acc["counts"].items():
            counts[status] += n
            if status != reasons.KEPT:
                by_reason[status][reason] = by_reason[status].get(reason, 0) + n
                by_stage[stage] += n
        remaining, funnel = sum(counts.values()), []
        funnel.append(("input", remaining))
        for stage in STAGES:
            remaining -= by_stage.get(stage, 0)
            funnel.append((STAGE_LABELS[stage], remaining))
        return {"input": sum(counts.values()), **counts, "by_reason": by_reason, "funnel": funnel,
                "aesthetic_scores": [v for _, v in acc["aesthetic"]], "clip_scores": [v for _, v in acc["clip"]],
                "cluster_sizes": sorted(acc["clusters"].values()),
                "duplicate_group_sizes": {str(k): v for k, v in sorted(acc["groups"].items())},
                "examples": {r: [e for _, _, e in items] for r, items in sorted(acc["examples"].items())}}


def table_stats(table, n_examples: int) -> tuple[str, dict]:
    """("stats", the ``CurateStats`` accumulator of a manifest table): made where the table is, so that
    only the accumulator (counts, a bounded sample) travels to the combine."""
    stats = CurateStats(n_examples)
    return "stats", stats.add_table(stats.create_accumulator(), table)


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def stages_run(stats: dict, config: dict) -> set[str]:
    """The funnel labels of the stages that ran: those the configuration runs, and any that removed records
    (a score stage ran when some record has that score)."""
    ran = {"input", *(STAGE_LABELS[s] for s in ("read", "normalise", "rules"))}
    on = {"exact_dedup": config.get("exact_dedup"), "download": config.get("download_images"),
          "images": config.get("download_images") or stats["clip_scores"] or stats["aesthetic_scores"],
          "aesthetic": stats["aesthetic_scores"], "clip_score": stats["clip_scores"],
          "semdedup": config.get("clip_model") and config.get("semdedup_eps") is not None}
    ran |= {STAGE_LABELS[s] for s, yes in on.items() if yes}
    previous = None
    for label, remaining in stats["funnel"]:
        if previous is not None and remaining < previous:
            ran.add(label)
        previous = remaining
    return ran


def render_plots(stats: dict, aesthetic_threshold: float | None, clip_threshold: float | None) -> dict[str, str]:
    """Base64 PNGs: funnel, aesthetic and CLIP-score histograms, cluster and group sizes (a plot only for
    what has values)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(stats["funnel"]) + 1))
    labels, values = zip(*stats["funnel"])
    ax.barh(range(len(values)), values, color="#4878a8")
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v}", va="center")
    ax.set_title("records remaining after each stage")
    plots["funnel"] = png(fig)
    for key, title, threshold in (("aesthetic_scores", "aesthetic score", aesthetic_threshold),
                                  ("clip_scores", "CLIP score (image-text cosine)", clip_threshold)):
        if stats[key]:
            fig, ax = plt.subplots(figsize=(6, 3))
            histogram(ax, stats[key], threshold, title)
            plots[key] = png(fig)
    groups = stats["duplicate_group_sizes"]
    if stats["cluster_sizes"] or groups:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
        histogram(ax1, stats["cluster_sizes"], None, "k-means cluster sizes (records)")
        ax2.bar([int(k) for k in groups], list(groups.values()), color="#4878a8")
        ax2.set_xticks([int(k) for k in groups])
        ax2.set_title("duplicate group sizes (kept + dropped)" if groups else "no duplicate groups")
        plots["clusters"] = png(fig)
    plt.close("all")
    return plots


PLOT_CAPTIONS = {"funnel": "funnel: records remaining after each stage that ran",
                 "aesthetic_scores": "aesthetic scores (dashed: the threshold)",
                 "clip_scores": "CLIP scores (dashed: the threshold or the cutoff)",
                 "clusters": "k-means cluster sizes and duplicate group sizes"}
NOT_RUN = {"aesthetic_scores": "aesthetic: the stage did not run (no record has an aesthetic score)",
           "clip_scores": "CLIP score: the stage did not run (no record has a CLIP score)",
           "clusters": "semantic dedup: the stage did not run (no clusters, no duplicate groups)"}


def _table(examples: list[dict]) -> dict:
    cols = sorted({k for e in examples for k in e}, key=lambda k: (k not in ("key", "caption"), k))
    return R.table(cols, [[e.get(c) if not isinstance(e.get(c), str) else e[c][:200] for c in cols] for e in examples])


def render_html(stats: dict, plots: dict[str, str], config: dict) -> str:
    rows = [[s, r, n] for s in stats["by_reason"] for r, n in sorted(stats["by_reason"][s].items())]
    figures = [R.figure(plots[k], PLOT_CAPTIONS[k], alt=k) if k in plots else R.note(NOT_RUN[k]) for k in PLOT_CAPTIONS]
    examples = [b for r, e in stats["examples"].items() for b in (R.heading(r), _table(e))]
    return R.render("Curate report", [
        R.section("Reasons", R.table(["status", "reason", "records"], rows)),
        R.section("Plots", *figures),
        R.section("Examples (kept and per reason)", *examples),
        R.section("Configuration", R.kv_table(config)),
    ], lead=[f"input {stats['input']} = kept {stats['kept']} + filtered {stats['filtered']} + duplicate "
             f"{stats['duplicate']} + rejected {stats['rejected']}"])


def write_report(stats: dict, output_dir: str, config: dict, clip_cutoff: float | None) -> dict:
    """``report.html`` and ``summary.json`` in ``output_dir``; returns the summary."""
    from apache_beam.io.filesystems import FileSystems

    clip_threshold = config.get("clip_score_threshold")
    clip_threshold = clip_cutoff if clip_threshold is None else clip_threshold
    ran = stages_run(stats, config)
    stats = dict(stats, funnel=[(label, n) for label, n in stats["funnel"] if label in ran])
    plots = render_plots(stats, config.get("aesthetic_threshold"), clip_threshold)
    atomic_write(FileSystems.join(output_dir, "report.html"), render_html(stats, plots, config).encode("utf-8"))
    summary = {k: stats[k] for k in ("input", "kept", "filtered", "duplicate", "rejected", "by_reason", "funnel",
                                     "duplicate_group_sizes")}
    summary.update(n_clusters=len(stats["cluster_sizes"]), clip_score_cutoff=clip_threshold, config=config)
    atomic_write(FileSystems.join(output_dir, "summary.json"), json.dumps(summary, indent=1).encode("utf-8"))
    return summary
