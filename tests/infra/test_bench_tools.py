"""The benchmark's own parts: the pass-through plugin (b) and the table printer."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import nbd
import pytest

from fixtures.nbdkit import NbdkitServer, nbd_connect

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_table  # noqa: E402
from bench_replication import WORKLOADS, Result, median_result, parse_size  # noqa: E402

PLUGIN = SCRIPTS / "passthrough_plugin.py"


@pytest.mark.parametrize("threads", ["serialize_all_requests", "parallel"])
def test_passthrough_plugin_writes_trims_and_zeros_the_file(
        nbdkit_server: Callable[..., NbdkitServer], sparse_image: Callable[..., Path],
        threads: str) -> None:
    image = sparse_image(4 << 20)
    server = nbdkit_server(PLUGIN, f"file={image}", f"threads={threads}")
    data = os.urandom(256 * 1024)
    h = nbd_connect(server.uri)
    try:
        assert h.get_size() == 4 << 20
        assert h.can_trim() and h.can_zero() and h.can_fua() and h.can_flush()
        h.pwrite(data, 512 * 1024)
        h.pwrite(b"\xff" * 4096, 0, nbd.CMD_FLAG_FUA)
        h.zero(8192, 512 * 1024 + 4096)
        h.trim(65536, 512 * 1024 + 128 * 1024)
        h.flush()
        assert h.pread(256 * 1024, 512 * 1024) == (
            data[:4096] + bytes(8192) + data[12288:128 * 1024] + bytes(65536)
            + data[192 * 1024:])
    finally:
        h.shutdown()
    raw = image.read_bytes()
    assert raw[:4096] == b"\xff" * 4096
    assert raw[512 * 1024:512 * 1024 + 4096] == data[:4096]
    assert raw[512 * 1024 + 4096:512 * 1024 + 12288] == bytes(8192)
    assert raw[512 * 1024 + 128 * 1024:512 * 1024 + 192 * 1024] == bytes(65536)
    assert raw[512 * 1024 + 192 * 1024:768 * 1024] == data[192 * 1024:]


def test_passthrough_plugin_refuses_an_unknown_parameter(
        nbdkit_server: Callable[..., NbdkitServer], sparse_image: Callable[..., Path]) -> None:
    image = sparse_image(1 << 20)
    with pytest.raises(Exception, match="unknown parameter 'flie'"):
        nbdkit_server(PLUGIN, f"flie={image}")


def test_table_aligns_columns_and_shows_missing_values_as_dashes() -> None:
    t = bench_table.Table("T", ["target", ("IOPS", ">"), ("vs (a)", ">")])
    t.add_section("4 KiB random write")
    t.add_row("(a) file", bench_table.fmt_count(105000), None)
    t.add_row("(b) python pass-through", bench_table.fmt_count(950), bench_table.ratio(950, 105000))
    t.add_note("a note")
    lines = t.render().splitlines()
    assert lines[0] == "T"
    header = lines[2]
    assert header.startswith("target") and header.endswith("vs (a)")
    rows = [ln for ln in lines if ln.startswith("(")]
    assert rows[0].split() == ["(a)", "file", "105.0k", "-"]
    assert rows[1].split()[-2:] == ["950", "0.01x"]
    # Right-aligned numbers end in the same column as their header.
    assert len(rows[0]) == len(rows[1]) == len(header)
    assert "[4 KiB random write]" in lines and lines[-1] == "  a note"


def test_table_refuses_a_row_of_the_wrong_width() -> None:
    t = bench_table.Table("T", ["a", "b"])
    with pytest.raises(ValueError, match="row has 1 cells"):
        t.add_row("only one")


def test_formatters() -> None:
    assert bench_table.fmt_ns(850) == "850 ns"
    assert bench_table.fmt_ns(45_300) == "45.3 us"
    assert bench_table.fmt_ns(1_250_000) == "1.25 ms"
    assert bench_table.fmt_bytes(4096) == "4.0 KiB"
    assert bench_table.fmt_bytes(3 << 30) == "3.00 GiB"
    assert bench_table.ratio(1, 0) is None and bench_table.ratio(None, 2) is None
    assert parse_size("1G") == 1 << 30 and parse_size("64MiB") == 64 << 20
    with pytest.raises(Exception, match="expected a number"):
        parse_size("lots")


def test_repeated_rounds_report_the_median_round_and_every_rounds_iops():
    w = WORKLOADS["randwrite-4k"]
    runs = [Result(w, "(c) x", "c", iops=v, p99_ns=v * 10) for v in (30e3, 10e3, 20e3)]
    pick = median_result(runs)
    assert pick.iops == 20e3 and pick.p99_ns == 200e3  # every column from that round
    assert pick.rounds == [30e3, 10e3, 20e3]
    failed = Result(w, "(c) x", "c", failed="run failed: boom")
    assert median_result([runs[0], failed]) is failed  # a failure is shown, not hidden


def test_lag_is_left_out_when_the_pair_hardly_streamed():
    from bench_replication import MIN_LAG_SAMPLES, _LagSampler
    states = iter([{"connection": "Established", "lag": {"seconds": 0.0}}]
                  + [{"connection": "Ahead", "ring": {"drops": 1}}] * 50)
    s = _LagSampler(lambda: next(states, {"connection": "Ahead"}), 0.001)
    s.start()
    time.sleep(0.2)
    s.stop()
    m = s.metrics()
    assert m["ring_drops"] == 1 and m["not_streaming"] > 0.9
    assert "lag_p50_ns" not in m, "one streaming sample is not a lag measurement"
    s = _LagSampler(lambda: {"connection": "Established", "lag": {"seconds": 0.003}}, 0.001)
    s.start()
    while len(s._samples) < MIN_LAG_SAMPLES:
        time.sleep(0.01)
    s.stop()
    assert s.metrics()["lag_p50_ns"] == pytest.approx(3e6)


def test_copy_floor_bounds_c_by_b_cpu_per_mib_plus_the_copies():
    from bench_floor import CopyCosts, floor_mb_per_s
    from bench_replication import floor_notes
    mib = 1 << 20
    costs = CopyCosts(memcpy=0.05e-3, crc=0.05e-3, tcp=0.5e-3, file_write=0.2e-3)
    assert costs.replication == pytest.approx(1.0e-3)
    # (b): 1000 MiB/s with 0.5 CPU of server and 0.5 of fio: 1 ms per MiB.
    w = WORKLOADS["seqwrite-1m"]
    b = Result(w, "(b) x", "b", iops=1000, bw_bytes=1000 * mib, server_cpus=0.5, fio_cpus=0.5)
    c = Result(w, "(c) x", "c", iops=400, bw_bytes=400 * mib, server_cpus=1.5, fio_cpus=0.2)
    assert b.cpu_per_mib() == pytest.approx(1e-3)
    # 2 CPUs / (1 ms + 1 ms per MiB) = 1000 MiB/s
    assert floor_mb_per_s(b.cpu_per_mib(), costs, 2) == pytest.approx(1000 * mib / 1e6)
    (note,) = floor_notes([b, c], costs)
    cpus = os.cpu_count()
    assert "serving the writes cost at least 1.00 ms of CPU per MiB (server and fio, (b)" in note
    assert "replicating adds at least 1.00 ms" in note
    assert f"{cpus / 2:.2f}x (b)" in note
    assert f"(c) reached {0.4 / (cpus / 2):.2f} of that bound" in note
    # The cheapest server sets the base: (p) at 0.5 ms per MiB.
    p = Result(w, "(p) x", "p", iops=1000, bw_bytes=1000 * mib, server_cpus=0.3, fio_cpus=0.2)
    (note,) = floor_notes([b, p, c], costs)
    assert "0.50 ms of CPU per MiB (server and fio, (p), the cheapest)" in note
    assert f"{cpus / 1.5:.2f}x (b)" in note
    # Only bulk workloads: per-request costs dominate small writes.
    r4 = WORKLOADS["randwrite-4k"]
    assert floor_notes([Result(r4, "(b) x", "b", iops=1, bw_bytes=4096, server_cpus=1,
                               fio_cpus=1)], costs) == []


def test_copy_costs_are_measured_per_mib(tmp_path):
    from bench_floor import measure_copy_costs
    costs = measure_copy_costs(tmp_path, mib=24)
    for name in ("memcpy", "crc", "tcp", "file_write"):
        v = getattr(costs, name)
        assert 0 <= v < 0.05, f"{name}: {v * 1e3:.3f} ms per MiB is not a per-MiB cost"
    assert costs.replication > 0
    assert not list(tmp_path.iterdir()), "the scratch file was left behind"


def test_two_exports_are_two_fio_jobs_at_half_the_iodepth_and_report_as_one(tmp_path):
    from bench_replication import fio_argv, merge_jobs
    w = WORKLOADS["randwrite-4k"]
    argv = fio_argv(["nbd+unix:///data?socket=/s", "nbd+unix:///wal?socket=/s"], w, 3, 1,
                    tmp_path / "o.json")
    jobs = [i for i, a in enumerate(argv) if a.startswith("--name=")]
    assert len(jobs) == 2
    # Each job's own options follow its --name: its export and half the depth.
    assert argv[jobs[0]:jobs[1]][1:] == ["--uri=nbd+unix:///data?socket=/s", "--iodepth=8"]
    assert argv[jobs[1]:][1:] == ["--uri=nbd+unix:///wal?socket=/s", "--iodepth=8"]
    assert fio_argv(["u"], w, 3, 1, tmp_path / "o.json")[-1] == "--iodepth=16"

    def job(iops, p99, cpu):
        return {"write": {"iops": iops, "bw_bytes": iops * 4096,
                          "lat_ns": {"percentile": {"99.000000": p99}}},
                "usr_cpu": cpu, "sys_cpu": cpu}
    one = job(100, 5, 1)
    assert merge_jobs([one]) is one
    both = merge_jobs([job(100, 5e6, 10), job(300, 2e6, 20)])
    assert both["write"]["iops"] == 400 and both["write"]["bw_bytes"] == 400 * 4096
    assert both["write"]["lat_ns"]["percentile"]["99.000000"] == 5e6  # the worse job
    assert both["usr_cpu"] + both["sys_cpu"] == 60
