"""``scripts/bench catchup``: a real run at a tiny size, its table, its cleanup."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fixtures.netns import list_namespaces

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_catchup  # noqa: E402
from bench_catchup import Measurement, ScenarioResult  # noqa: E402

TINY = ["--size", "32M", "--dirty", "10", "--fill", "25", "--ring-size", "1M",
        "--journal-size", "16M", "--scratch", "shm", "--timeout", "60"]


def test_tiny_run_measures_both_scenarios_against_nbdcopy_and_leaves_nothing_behind() -> None:
    o = bench_catchup.parse_args(TINY)
    results, where = bench_catchup.measure_all(o)
    assert where.startswith("images on /dev/shm")
    assert [r.key for r in results] == ["catchup", "initial-sync"]
    for r in results:
        for m in (r.duplex, r.baseline):
            assert m.failed is None, f"{r.key}: {m.label}: {m.failed}"
            assert m.seconds is not None and m.seconds > 0
            assert m.wire_tx is not None and m.wire_rx is not None
        # nbdcopy moved the whole device across the veth, and no more than
        # the device plus protocol overhead.
        assert r.baseline.data_bytes == o.size
        assert o.size <= r.baseline.wire_bytes < o.size * 1.2
    catchup, sync = results
    # Only the out-of-sync tracks travel: 10% of bytes dirtied touches well
    # under the whole device, and at least the bytes written.
    assert o.dirty_bytes <= catchup.duplex.data_bytes < o.size
    assert catchup.duplex.data_bytes <= catchup.duplex.wire_bytes < catchup.baseline.wire_bytes
    # The initial sync moved at least the primary's data over the wire.
    assert sync.duplex.data_bytes >= o.size * 25 // 100
    assert sync.duplex.wire_bytes >= sync.duplex.data_bytes

    table = bench_catchup.build_table(results, o, where)
    rows = {row[0]: row for row in table.rows}
    assert set(rows) == {"Duplex catch-up (link up -> in sync)", "nbdcopy, whole device",
                         "Duplex initial sync (start -> UpToDate)"}
    duplex_row = rows["Duplex catch-up (link up -> in sync)"]
    assert duplex_row[4].endswith("x") and duplex_row[5].endswith("x")
    assert float(duplex_row[5][:-1]) < 1.0  # fewer wire bytes than a full copy

    # Cleanup: namespaces, scratch images, the lab's export socket.
    pid = os.getpid()
    assert list_namespaces(f"dpx-{pid}-") == []
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"dpx-catchup-{pid}-")]
    assert not [p for p in Path("/run/duplex").glob(f"lab-{pid}-*")]


def test_a_dirty_amount_that_cannot_overflow_the_ring_is_refused_with_the_numbers(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench_catchup.parse_args(["--size", "32M", "--dirty", "1", "--ring-size", "1M"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dirty 1% of 32.0 MiB is 324.0 KiB" in err and "1.0 MiB send ring" in err


def test_default_ring_is_sized_so_one_percent_of_the_device_overflows_it() -> None:
    assert bench_catchup.parse_args([]).ring_size == 16 << 20           # 4 GiB: 41 MiB dirtied
    assert bench_catchup.parse_args(["--size", "512M"]).ring_size == 1 << 20


def test_a_failed_row_shows_failed_and_its_reason_and_no_numbers() -> None:
    o = bench_catchup.parse_args(["--size", "32M", "--dirty", "10"])
    ok = Measurement("nbdcopy, whole device", seconds=1.5, data_bytes=o.size,
                     wire_tx=o.size, wire_rx=1000)
    bad = Measurement("Duplex catch-up (link up -> in sync)",
                      failed="the primary did not go Ahead within 30 s")
    table = bench_catchup.build_table(
        [ScenarioResult("catchup", "catch-up", bad, ok)], o, "images on /dev/shm")
    failed, base = table.rows
    assert failed == ["Duplex catch-up (link up -> in sync): FAILED", "-", "-", "-", "-", "-"]
    assert base[:2] == ["nbdcopy, whole device", "1.50"]
    assert any("FAILED: the primary did not go Ahead within 30 s" in n for n in table.notes)


def test_nbdkit_stats_write_line_is_read_as_bytes(tmp_path: Path) -> None:
    f = tmp_path / "stats"
    f.write_text("total: 34 ops, 1.028212 s, 8.00 MiB, 7.78 MiB/s\n"
                 "write: 32 ops, 0.002284 s, 8.00 MiB, 3.42 GiB/s op, 7.78 MiB/s total\n"
                 "flush: 2 ops, 0.007011 s, 0 bytes, 0 bytes/s op, 0 bytes/s total\n")
    assert bench_catchup.nbdkit_stats_write_bytes(f) == 8 << 20
    f.write_text("flush: 2 ops, 0.007011 s, 0 bytes, 0 bytes/s op, 0 bytes/s total\n")
    assert bench_catchup.nbdkit_stats_write_bytes(f) == 0
