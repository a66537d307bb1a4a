"""``scripts/bench modes``' pure parts: the status samples' shares and
percentiles, CPU per write and each host's share, the issue-14 targets'
pass/miss, and its options. (The bench itself is run by hand: its numbers
are timings, never asserted.)"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_modes  # noqa: E402
from bench_floor import CopyCosts  # noqa: E402
from bench_modes import Result, check_targets, sample_metrics  # noqa: E402
from bench_replication import WORKLOADS  # noqa: E402

W4K, W1M = WORKLOADS["randwrite-4k"], WORKLOADS["seqwrite-1m"]


def test_not_streaming_counts_every_sample_outside_established():
    states = ["Established"] * 6 + ["Ahead", "SyncSource", "Ahead", "Established"]
    m = sample_metrics(states, [0.001] * 7)
    assert m["not_streaming"] == pytest.approx(0.3)
    assert sample_metrics(["Established"] * 4, [])["not_streaming"] == 0


def test_lag_percentiles_need_enough_streaming_samples():
    assert "lag_p99_ns" not in sample_metrics(["Established"] * 4, [0.01] * 4)
    lags = [0.001] * 98 + [0.030, 0.200]
    m = sample_metrics(["Established"] * 100, lags)
    assert m["lag_p50_ns"] == pytest.approx(1e6)
    assert m["lag_p99_ns"] == pytest.approx(200e6)  # nearest rank: the worst of 100


def test_cpu_per_write_counts_every_server_and_fio_and_fio_is_the_primary_hosts():
    r = Result("cC", W4K, iops=10_000.0, bw_bytes=40e6,
               host_cpus={"primary": 0.6, "secondary": 0.3}, fio_cpus=0.1)
    assert r.cpu_us_per_write() == pytest.approx(100.0)  # 1.0 CPU / 10k writes/s
    share = r.host_share()
    assert share["primary"] == pytest.approx(0.7) and share["secondary"] == pytest.approx(0.3)
    assert Result("a", W4K, iops=1.0).cpu_us_per_write() is None  # not measured: no number


def _row(key, workload, iops, bw=None, **metrics):
    return Result(key, workload, iops=iops, bw_bytes=bw or iops * 4096,
                  host_cpus={"primary": 0.5, "secondary": 0.5}, fio_cpus=0.2,
                  metrics=dict(metrics))


def _verdicts(results, costs=None):
    return {c.what: c.passed for c in check_targets(results, costs, cpus=2)}


def test_protocol_c_targets_are_ratios_to_the_qemu_mirrors_of_the_same_run():
    rows = [_row("qw", W4K, 4000), _row("qb", W4K, 9000), _row("cC", W4K, 8000)]
    v = _verdicts(rows)
    assert v["4 KiB, protocol C >= 1.5x (qw) write-blocking"] is True    # 2.0x
    assert v["4 KiB, protocol C > (qb) background"] is False             # 0.89x
    rows[0].iops = 6000                                                  # 1.33x
    assert _verdicts(rows)["4 KiB, protocol C >= 1.5x (qw) write-blocking"] is False
    rows[2].failed = "run failed: fio timed out"
    assert _verdicts(rows)["4 KiB, protocol C >= 1.5x (qw) write-blocking"] is None


def test_block_misses_when_any_sample_was_not_streaming_or_under_the_floor():
    costs = CopyCosts(memcpy=0.05e-3, crc=0.05e-3, tcp=0.35e-3, file_write=0.2e-3)
    base = _row("a", W1M, 1000, bw=1000 * (1 << 20))  # 1.2 CPUs over 1000 MiB/s
    floor = bench_modes.copy_floor([base], costs, 2)
    assert floor == pytest.approx(2 / (1.2e-3 + costs.replication) * (1 << 20) / 1e6)
    fast = _row("cb", W1M, 700, bw=0.85 * floor * 1e6, not_streaming=0.0, pull_aheads=0)
    v = _verdicts([base, fast], costs)
    assert v["1 MiB, A + block: never Ahead or catching up"] is True
    assert v["1 MiB, A + block >= 0.8 of the copy floor"] is True
    ahead = _row("cb", W1M, 700, bw=0.5 * floor * 1e6, not_streaming=0.02, pull_aheads=1)
    v = _verdicts([base, ahead], costs)
    assert v["1 MiB, A + block: never Ahead or catching up"] is False
    assert v["1 MiB, A + block >= 0.8 of the copy floor"] is False


def test_lag_targets_hold_only_with_the_p99_under_the_bound_and_max_lag_streaming():
    ok = _row("c/2", W4K, 5000, not_streaming=0.0, lag_p99_ns=30e6)
    late = _row("cb/2", W1M, 100, lag_p99_ns=70e6)
    held_but_ahead = _row("cm", W1M, 900, not_streaming=0.4, lag_p99_ns=20e6)
    v = _verdicts([ok, late, held_but_ahead])
    assert v["4 KiB, (c/2): lag p99 < 50 ms at half rate"] is True
    assert v["1 MiB, (cb/2): lag p99 < 50 ms at half rate"] is False
    assert v[f"1 MiB, (cm): max-lag {bench_modes.MAX_LAG} holds (lag p99 <= 100 ms, never Ahead)"] is False
    assert v["4 KiB, (c/2): lag p99 < 50 ms at half rate"] is True
    assert v["1 MiB, (c/2): lag p99 < 50 ms at half rate"] is None       # not run
    assert "4 KiB, (cb/2): lag p99 < 50 ms at half rate" not in v        # optional row
    ok.metrics["lag_p99_ns"] = 50e6                                      # "under 50 ms"
    assert _verdicts([ok])["4 KiB, (c/2): lag p99 < 50 ms at half rate"] is False
    held = _row("cm", W4K, 900, not_streaming=0.0, lag_p99_ns=100e6)     # "at most"
    assert _verdicts([held])[f"4 KiB, (cm): max-lag {bench_modes.MAX_LAG} holds (lag p99 <= 100 ms, never Ahead)"] is True


def test_the_table_prints_every_target_with_pass_or_miss():
    o = bench_modes.parse_args(["--quick"])
    rows = [_row("qw", W4K, 4000), _row("qb", W4K, 9000), _row("cC", W4K, 8000)]
    text = bench_modes.build_table(rows, o).render()
    lines = text.splitlines()
    wb = next(ln for ln in lines if ln.startswith("4 KiB, protocol C >= 1.5x (qw)"))
    assert wb.split()[-2:] == ["2.00x", "pass"]
    bg = next(ln for ln in lines if ln.startswith("4 KiB, protocol C > (qb)"))
    assert bg.split()[-2:] == ["0.89x", "MISS"]
    assert "(cC) Duplex protocol C" in text and "2.00x" in text


@pytest.mark.parametrize("argv, words", [
    (["--targets", "c,zz"], "unknown target 'zz'"),
    (["--targets", "cb/2"], "include c"),
    (["--workloads", "randread"], "unknown workload"),
    (["--link-mb", "0"], "--link-mb"),
    (["--link-limit", "netem"], "invalid choice"),
    (["--repeat", "0"], "--repeat"),
])
def test_bad_options_are_named(argv, words, capsys):
    with pytest.raises(SystemExit):
        bench_modes.parse_args(argv)
    assert words in capsys.readouterr().err


def test_b_runs_only_with_the_bulk_workload():
    assert bench_modes.run_keys(["a", "b", "cC"], W4K) == ["a", "cC"]
    assert bench_modes.run_keys(["a", "b", "cC"], W1M) == ["a", "b", "cC"]
