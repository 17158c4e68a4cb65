"""Progress of the long steps: the shared helper (fake clock and stream), the dump, the filter, curate, profile."""

import io
import json
import logging
import re
import threading

import pytest

from core import progress as P


class Clock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def lines_of(stream) -> list[str]:
    """What a reader sees: each ``\\r`` redraw and each line, escape codes removed."""
    text = re.sub(r"\x1b\[K", "", stream.getvalue())
    return [part for line in text.split("\n") for part in line.split("\r") if part]


# ---------------------------------------------------------------------------------------------
# core.progress
# ---------------------------------------------------------------------------------------------


def test_modes_from_the_flag_the_runner_and_the_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert P.resolve_mode("off", local=True, stream=Tty()) == "off"
    assert P.resolve_mode("auto", local=True, stream=Tty()) == "bar"
    assert P.resolve_mode("auto", local=True, stream=io.StringIO()) == "lines"
    assert P.resolve_mode("auto", local=False, stream=Tty()) == "log"
    assert P.resolve_mode("on", local=True, stream=io.StringIO()) == "bar"
    assert P.resolve_mode("on", local=False) == "log"
    with pytest.raises(ValueError):
        P.resolve_mode("maybe")


def test_eta_is_elapsed_per_unit_times_the_units_left():
    assert P.eta_seconds(30.0, 2, 5) == pytest.approx(75.0)  # (30 / 2) * 5
    assert P.eta_seconds(30.0, 0, 5) is None and P.eta_seconds(30.0, 3, 0) == 0.0
    assert [P.format_duration(s) for s in (None, 4.24, 42, 185, 7620)] == ["?", "4.2 s", "42 s", "3m05s", "2h07m"]


def test_overall_line_reports_i_of_n_samples_and_the_eta():
    clock, out = Clock(), io.StringIO()
    bar = P.UnitProgress("teacher dump", 7, samples_total=70, reporter=P.Reporter("lines", stream=out, clock=clock,
                                                                                  interval=0), clock=clock)
    for i in range(3):
        with bar.unit(f"{i:06d}", 10) as unit:
            clock.t += 4.0
            unit.update(6)  # a batch: a line (interval 0) with the samples so far
        # the unit's remaining 4 samples counted when it ends
    got = lines_of(out)
    assert got[-1] == "teacher dump: shards 3/7, samples 30/70, 12 s elapsed, ETA 16 s"  # (12 / 3) * (7 - 3)
    assert got[0] == "teacher dump: shards 0/7, samples 6/70, 4.0 s elapsed, ETA 43 s"  # before a shard: (4 / 6) * 64 samples
    assert all("shards" in line for line in got)


@pytest.mark.parametrize("done,elapsed,total", [(1, 5.0, 4), (2, 9.0, 9), (5, 100.0, 6)])
def test_eta_of_the_line_follows_the_formula(done, elapsed, total):
    clock, out = Clock(), io.StringIO()
    bar = P.UnitProgress("job", total, reporter=P.Reporter("lines", stream=out, clock=clock, interval=0), clock=clock)
    for _ in range(done):
        bar.finish()
    clock.t = elapsed
    assert bar.eta() == pytest.approx(elapsed / done * (total - done))
    assert f"ETA {P.format_duration(elapsed / done * (total - done))}" in bar.line()


def test_skipped_units_count_as_done_but_not_as_work():
    clock = Clock()
    bar = P.UnitProgress("job", 4, reporter=P.Reporter("off"), clock=clock)
    bar.skip("000000", 10)
    bar.skip("000001", 10)
    assert bar.eta() is None  # nothing worked on yet
    clock.t = 6.0
    bar.finish("000002", 10)
    assert bar.done == 3 and bar.eta() == pytest.approx(6.0)  # one worked unit took 6 s, one left


def test_a_failed_unit_takes_its_samples_back():
    bar = P.UnitProgress("job", 2, samples_total=8, reporter=P.Reporter("off"))
    with pytest.raises(RuntimeError):
        with bar.unit("000000", 4) as unit:
            unit.update(3)
            raise RuntimeError("teacher failed")
    assert bar.done == 0 and bar.samples == 0


def test_lines_at_most_every_interval_and_the_last_unit_always():
    clock, out = Clock(), io.StringIO()
    bar = P.UnitProgress("job", 10, reporter=P.Reporter("lines", stream=out, clock=clock, interval=5.0), clock=clock)
    for _ in range(10):
        clock.t += 1.0
        bar.finish()
    got = lines_of(out)
    assert [re.match(r"job: shards (\d+)/10", line).group(1) for line in got] == ["1", "6", "10"]


def test_bar_mode_redraws_one_line_and_ends_it_on_close():
    clock, out = Clock(), io.StringIO()
    bar = P.UnitProgress("job", 2, reporter=P.Reporter("bar", stream=out, clock=clock), clock=clock)
    clock.t = 1.0
    bar.finish()
    clock.t = 2.0
    bar.finish()
    bar.close()
    text = out.getvalue()
    assert text.startswith("\rjob: shards 1/2 [##########..........]") and text.endswith("\n")
    assert text.count("\n") == 1 and "\rjob: shards 2/2 [####################]" in text


def test_log_mode_one_record_per_unit_naming_it(caplog):
    clock = Clock()
    bar = P.UnitProgress("job", 3, reporter=P.Reporter("log", clock=clock), clock=clock)
    with caplog.at_level(logging.INFO, logger="distill.progress"):
        for _ in range(3):
            clock.t += 2.0
            with bar.unit("000004", 5) as unit:
                unit.update(5)  # no record for the samples: one per unit
    assert [r.getMessage().split(", samples")[0] for r in caplog.records] == [
        "job: shard 000004 done, shards 1/3", "job: shard 000004 done, shards 2/3", "job: shard 000004 done, shards 3/3"]
    assert caplog.records[0].getMessage().endswith("ETA 4.0 s")  # (2 / 1) * 2


def test_log_mode_counts_every_workers_shards_where_they_land():
    """A remote worker sees its own units only: i is read from ``count_done``, the ETA from the run's start."""
    done = [4]
    clock = Clock(110.0)
    bar = P.UnitProgress("job", 10, reporter=P.Reporter("off"), clock=clock, start=100.0,
                         count_done=lambda: done[0], done_before=2)
    bar.finish("000007")
    assert bar.done == 4 and bar.eta() == pytest.approx(10.0 / 2 * 6)


def test_threads_share_one_counter():
    bar = P.UnitProgress("job", 64, samples_total=64 * 8, reporter=P.Reporter("lines", stream=io.StringIO(), interval=0))

    def work(k):
        for i in range(8):
            with bar.unit(f"{k}-{i}", 8) as unit:
                for _ in range(8):
                    unit.update(1)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bar.done == 64 and bar.samples == 512


def test_stage_counts_lines_with_rate_and_kept():
    clock, out = Clock(), io.StringIO()
    counts = P.StageCounts("curate", reporter=P.Reporter("lines", stream=out, clock=clock, interval=5.0), clock=clock)
    clock.t = 1.0
    counts.add("read", 4000)
    clock.t = 2.0
    counts.add("read", 4000)  # not due: no line
    counts.add("caption_rules", 8000, 7900)
    clock.t = 8.0
    counts.add("exact_dedup", 7900, 7800)
    counts.close()
    got = lines_of(out)
    assert got == ["curate: read 4,000 records (4,000/s) (1.0 s elapsed)",
                   "curate: read 8,000 records (1,000/s); stage caption_rules: 7,900 kept of 8,000; "
                   "stage exact_dedup: 7,800 kept of 7,900 (8.0 s elapsed)",
                   "curate: read 8,000 records (1,000/s); stage caption_rules: 7,900 kept of 8,000; "
                   "stage exact_dedup: 7,800 kept of 7,900 (done in 8.0 s)"]


def test_off_writes_nothing(capsys):
    counts = P.StageCounts("curate", reporter=P.Reporter("off"))
    counts.add("read", 5)
    counts.close()
    bar = P.UnitProgress("job", 1, reporter=P.Reporter("off"))
    bar.finish()
    bar.close()
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------------------------------
# the jobs
# ---------------------------------------------------------------------------------------------

CAPTIONS = ["a red boat at sea", "a cat on a mat", "a green tree on a hill"]


def test_dump_progress_on_writes_the_overall_line(make_dump, capsys):
    capsys.readouterr()
    out = make_dump(captions=CAPTIONS, progress="on", samples_per_shard=4, feature_layers="", num_feature_steps=0)
    err = capsys.readouterr().err
    seen = lines_of(io.StringIO(err))
    overall = [line for line in seen if line.startswith("teacher dump: shards")]
    assert overall and overall[-1].startswith("teacher dump: shards 1/1 [####################], samples 3/3, "), err
    assert overall[-1].endswith("ETA 0.0 s")
    assert "shard 000000.tar" not in err  # no per-shard bar any more
    # a re-run finds the shard complete: counted as done, no work
    from pipelines import teacher_dump
    from conftest import dump_argv

    teacher_dump.run(dump_argv(f"{out}/../p.txt", out, **{"progress": "on", "samples_per_shard": 4,
                                                           "feature_layers": "", "num_feature_steps": 0}))
    assert "teacher dump: shards 1/1" in capsys.readouterr().err


def test_dump_progress_off_writes_no_progress(make_dump, capsys):
    capsys.readouterr()
    make_dump(captions=CAPTIONS[:1], progress="off", feature_layers="", num_feature_steps=0)
    err = capsys.readouterr().err
    assert "shards" not in err.replace("shards,", "")  # the summary line's "N shards," only


def test_a_worker_of_its_own_logs_each_shard_counted_from_storage(make_dump, caplog):
    """Where the work units run in another process (multi-process, Dask, Dataflow) the launcher's counter is
    not there: the worker makes one that logs, with i read from the shards complete in the output."""
    import time

    from pipelines import common

    out = make_dump(captions=CAPTIONS, samples_per_shard=1, feature_layers="", num_feature_steps=0)
    spec = common.ProgressSpec(run="another-process", label="teacher dump", mode="lines", output=out,
                               started=time.time() - 30.0, done_before=1)
    counter = common.shard_progress(spec)
    try:
        assert counter.total == 3 and counter.reporter.mode == "log"
        with caplog.at_level(logging.INFO, logger="distill.progress"):
            counter.finish("000002")
        (record,) = caplog.records
        message = record.getMessage()
        assert message.startswith("teacher dump: shard 000002 done, shards 3/3, ") and "samples" not in message
    finally:
        common.end_progress(spec)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    import torch

    from filters.aesthetic import AestheticMLP
    from conftest import run_dump

    tmp = tmp_path_factory.mktemp("scored")
    torch.manual_seed(0)
    torch.save(AestheticMLP(32).state_dict(), tmp / "aes.pth")
    return run_dump(tmp, CAPTIONS + ["a photo of thing number 1"], resolution=64, num_inference_steps=2,
                    samples_per_shard=2, batch_size=2, feature_layers="", num_feature_steps=0, save_images=True,
                    score_images="tiny", aesthetic_weights=str(tmp / "aes.pth"))


@pytest.mark.parametrize("progress", ["on", "off"])
def test_filter_progress(scored, tmp_path, capsys, progress):
    from pipelines import filter_shards

    capsys.readouterr()
    dataset = filter_shards.run(["--input", scored, "--output", str(tmp_path / "f"), "--semdedup_eps", "none",
                                 "--samples_per_shard", "2", "--progress", progress])
    n, kept = len(dataset["shards"]), dataset["totals"]["kept"]
    err = capsys.readouterr().err
    overall = [line for line in lines_of(io.StringIO(err)) if line.startswith("filter: shards")]
    if progress == "off":
        assert overall == []
    else:
        assert n == 2 and overall[-1].startswith(f"filter: shards {n}/{n} ") and f"samples {kept}/{kept}" in overall[-1]


def _curate(tmp_path, progress, *extra):
    from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

    from pipelines import curate

    lines = [f"a photo of house number {i % 9}" for i in range(30)] + ["hi", "ok"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    return curate.run(["--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "out"), "--progress", progress,
                       *extra], test_pipeline=BeamTestPipeline())


@pytest.mark.parametrize("record_batch", ["4096", "0"])
def test_curate_progress_on_counts_records_and_stages(tmp_path, capsys, record_batch):
    summary = _curate(tmp_path, "on", "--record_batch", record_batch)
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("curate: ")]
    assert ours, err
    last = ours[-1]
    assert last.startswith("curate: read 32 records (") and "done in" in last
    assert "stage caption_rules: 30 kept of 32" in last  # "hi" and "ok" are too short
    assert f"stage exact_dedup: {summary['kept']} kept of 32" in last  # the dropped rows pass
    assert len(ours) <= 2  # at most one line per few seconds, then the totals


def test_curate_progress_off_writes_none(tmp_path, capsys):
    _curate(tmp_path, "off")
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("curate: ")]


def test_curate_counts_the_record_stages_too(tmp_path, capsys):
    _curate(tmp_path, "on", "--preset", "tiny")
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("curate: ")][-1]
    assert "stage clip_embed:" in last and "stage score_filter:" in last and "stage semdedup:" in last, last


# ---------------------------------------------------------------------------------------------
# distill profile
# ---------------------------------------------------------------------------------------------


def test_profile_one_line_before_and_after_each_model(capsys):
    from students.cost import profile

    assert profile.main(["--presets", "tiny", "--repeats", "1", "--warmup", "0", "--no-blocks"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[profile]")]
    starts = [line for line in err if " start" in line]
    done = [line for line in err if " done" in line]
    assert [line.split()[1:3] for line in starts] == [["1/2", "tiny_teacher"], ["2/2", "tiny"]], err
    assert [line.split()[1:3] for line in done] == [["1/2", "tiny_teacher:"], ["2/2", "tiny:"]], err
    assert "1 left, ETA" in done[0] and "0 left" in done[1] and " ms" in done[1]


def test_profile_skip_latency_reports_each_model(capsys):
    from students.cost import profile

    assert profile.main(["--presets", "tiny,vae_tiny", "--skip-latency", "--no-blocks"]) == 0
    done = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[profile]") and " done" in line]
    assert len(done) == 4 and all("GMACs" in line for line in done)
