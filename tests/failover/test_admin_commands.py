"""The admin's commands a DRBD admin reaches for (DESIGN §7), each through
the running node's control socket, on a real pair (nbdkit, TCP between two
namespaces): ``disconnect``/``connect``, ``invalidate``,
``invalidate-remote``, ``pause-sync``/``resume-sync``, ``outdate``. Each:
the happy path, the data checked by comparing image bytes after the sync,
and each refusal (exit 1, one line naming why, nothing changed)."""
from __future__ import annotations

import os
import time


from fixtures.duplex_lab import RESOURCE
from replicator.metadata import load_metadata
from fixtures.nbdio import write_all


_write = write_all


def _random_writes(n: int, size: int) -> list[tuple[int, bytes]]:
    import random
    rnd = random.Random(n)
    return [(rnd.randrange(0, size // 4096 - 8) * 4096, os.urandom(4096 * rnd.randint(1, 8)))
            for _ in range(n)]


def _refused(lab, node: str, *args: str) -> str:
    r = lab.duplex(node, *args, check=False)
    assert r.returncode == 1, f"duplex {' '.join(args)} on {node} was not refused:\n{r.stdout}"
    assert "Traceback" not in r.stderr and r.stderr.startswith("duplex: error: "), r.stderr
    return r.stderr


def _drained(lab) -> bool:
    p, s = lab.control("alpha"), lab.control("beta")
    w = p["seq"]["written"]
    return (p["replication"] == "Established" and p["out_of_sync_bytes"] == 0
            and s["seq"]["applied"] >= w and p["seq"]["journaled"] >= w
            and s["disk"] not in ("Inconsistent", "Outdated"))


def _same_images(lab) -> bool:
    return lab.image["alpha"].read_bytes() == lab.image["beta"].read_bytes()


def _corrupt(path, offset: int, length: int) -> None:
    """Damage the secondary's image behind Duplex's back (a bad disk)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(length))
        f.flush()
        os.fsync(f.fileno())


def _settled_increment_bytes(lab, timeout: float = 30.0) -> int:
    """The primary's increment bytes sent, once two reads 0.5 s apart agree."""
    deadline = time.monotonic() + timeout
    last = lab.control("alpha")["incr_bytes_sent"]
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = lab.control("alpha")["incr_bytes_sent"]
        if now == last:
            return now
        last = now
    raise AssertionError(f"increment data still going out {timeout:g} s after pause-sync")


def _pair(make_lab, **options):
    lab = make_lab(size=16 << 20, options=options)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    _write(lab.uri, _random_writes(30, lab.size))
    lab.wait(lambda: _drained(lab), "the first writes to reach beta")
    return lab


def test_disconnect_and_connect_on_the_primary_keep_every_write(make_lab):
    lab = _pair(make_lab)
    r = lab.duplex("alpha", "disconnect", RESOURCE)
    assert "StandAlone (disconnected by the admin)" in r.stdout, r.stdout
    st = lab.control("alpha")
    assert (st["connection"], st["replication"]) == ("StandAlone", "Ahead"), st
    assert "disconnected by the admin" in st["reason"]
    line = lab.duplex("alpha", "status", RESOURCE).stdout
    assert "peer beta: StandAlone (disconnected by the admin) Ahead" in line, line
    assert "already disconnected" in _refused(lab, "alpha", "disconnect", RESOURCE)

    lab.wait(lambda: lab.control("beta")["connection"] != "Established", "beta to see it go")
    before = lab.control("beta")["seq"]["applied"]
    handshakes = lab.secondary.log_text(1 << 20).count("primary alpha connected")
    _write(lab.uri, _random_writes(20, lab.size))  # while StandAlone: only the bitmap
    time.sleep(1.5)  # the shipper would have reconnected by now (backoff <= 2 s)
    assert lab.secondary.log_text(1 << 20).count("primary alpha connected") == handshakes, \
        "alpha connected again while disconnected by the admin"
    st = lab.control("alpha")
    assert st["connection"] == "StandAlone" and st["out_of_sync_bytes"] > 0, st
    assert st["ring"].get("records", 0) == 0, st["ring"]  # Ahead: the bitmap alone keeps them
    assert lab.control("beta")["seq"]["applied"] == before
    assert not _same_images(lab)

    r = lab.duplex("alpha", "connect", RESOURCE)
    assert "connects to its peer again" in r.stdout, r.stdout
    lab.wait(lambda: _drained(lab), "the catch-up after connect")
    assert _same_images(lab)


def test_disconnect_on_the_secondary_is_standalone_until_connect_and_not_kept_by_up(make_lab):
    lab = _pair(make_lab)
    r = lab.duplex("beta", "disconnect", RESOURCE)
    assert "StandAlone (disconnected by the admin)" in r.stdout, r.stdout
    st = lab.control("beta")
    assert st["connection"] == "StandAlone" and "disconnected by the admin" in st["reason"], st
    line = lab.duplex("beta", "status", RESOURCE).stdout
    assert "peer alpha: StandAlone (disconnected by the admin)" in line, line
    assert "already disconnected" in _refused(lab, "beta", "disconnect", RESOURCE)
    lab.wait(lambda: lab.control("alpha")["connection"] != "Connected", "alpha to see it go")
    _write(lab.uri, _random_writes(10, lab.size))
    time.sleep(1.0)
    assert lab.control("beta")["connection"] == "StandAlone"

    r = lab.duplex("beta", "connect", RESOURCE)
    assert "connects to its peer again" in r.stdout, r.stdout
    lab.wait(lambda: _drained(lab), "streaming again")
    assert _same_images(lab)

    # Not persisted (as DRBD's is not): a restart connects.
    lab.duplex("beta", "disconnect", RESOURCE)
    lab.duplex("beta", "down", RESOURCE, timeout=60)
    lab.start_secondary()
    _write(lab.uri, _random_writes(5, lab.size))
    lab.wait(lambda: _drained(lab), "streaming after the restart")
    assert _same_images(lab)


def test_invalidate_on_the_secondary_resyncs_every_track_from_the_primary(make_lab):
    lab = _pair(make_lab)
    assert "Primary" in _refused(lab, "alpha", "invalidate", RESOURCE)
    _corrupt(lab.image["beta"], 3 << 20, 256 << 10)
    assert not _same_images(lab)  # nothing else would repair it

    lab.duplex("alpha", "pause-sync", RESOURCE)  # hold the full sync: look at beta first
    r = lab.duplex("beta", "invalidate", RESOURCE)
    assert "full sync" in r.stdout, r.stdout
    assert load_metadata(lab.meta["beta"], RESOURCE).invalidated  # persisted
    lab.wait(lambda: lab.control("alpha")["out_of_sync_bytes"] == lab.size,
             "alpha to mark every track out of sync")
    assert lab.control("beta")["disk"] == "Inconsistent"
    assert "the peer's data was invalidated by the admin" in lab.control("alpha")["reason"]
    assert "invalidated already" in _refused(lab, "beta", "invalidate", RESOURCE)
    err = _refused(lab, "beta", "promote", RESOURCE, "--wait", "0")  # gone until the sync ends
    assert "invalidated" in err and "--force" in err, err
    lab.duplex("alpha", "resume-sync", RESOURCE)
    lab.wait(lambda: _drained(lab) and not load_metadata(lab.meta["beta"], RESOURCE).invalidated,
             "the full sync after invalidate")
    assert _same_images(lab)
    assert lab.control("beta")["disk"] in ("UpToDate", "Consistent")

    # Refused while no primary is connected: no source to sync from.
    lab.duplex("beta", "disconnect", RESOURCE)
    err = _refused(lab, "beta", "invalidate", RESOURCE)
    assert "no primary is connected" in err and "no source" in err, err
    assert not load_metadata(lab.meta["beta"], RESOURCE).invalidated


def test_invalidate_remote_on_the_primary_resends_every_track(make_lab):
    lab = _pair(make_lab)
    err = _refused(lab, "beta", "invalidate-remote", RESOURCE)
    assert "Secondary" in err and "alpha" in err, err
    _corrupt(lab.image["beta"], 5 << 20, 128 << 10)
    assert not _same_images(lab)

    r = lab.duplex("alpha", "invalidate-remote", RESOURCE)
    assert "every track" in r.stdout and "16.0 MiB" in r.stdout, r.stdout
    lab.wait(lambda: _drained(lab), "the full sync to beta")
    assert _same_images(lab)

    lab.duplex("alpha", "disconnect", RESOURCE)
    err = _refused(lab, "alpha", "invalidate-remote", RESOURCE)
    assert "not connected" in err, err


def test_pause_sync_stops_the_increments_and_resume_sync_finishes_them(make_lab):
    # 1 MiB/s: a full sync of 16 MiB of random data takes long enough to pause.
    lab = _pair(make_lab, **{"resync-rate": "1MiB"})
    _write(lab.uri, [(off, os.urandom(1 << 20)) for off in range(0, lab.size, 1 << 20)])
    lab.wait(lambda: _drained(lab), "the random data to reach beta")
    _corrupt(lab.image["beta"], 0, 64 << 10)
    lab.duplex("alpha", "invalidate-remote", RESOURCE)
    lab.wait(lambda: (lab.control("alpha").get("sync") or {}).get("done_bytes", 0) > 0,
             "the full sync to start")

    for cmd in ("pause-sync", "resume-sync"):
        err = _refused(lab, "beta", cmd, RESOURCE)
        assert "primary alpha" in err, err
    assert "not paused" in _refused(lab, "alpha", "resume-sync", RESOURCE)
    r = lab.duplex("alpha", "pause-sync", RESOURCE)
    assert "sync paused (by the admin)" in r.stdout, r.stdout
    assert "already paused" in _refused(lab, "alpha", "pause-sync", RESOURCE)
    st = lab.control("alpha")
    assert "sync paused (by the admin)" in st["reason"] and st["replication"] != "Established"
    assert "sync paused (by the admin)" in lab.duplex("alpha", "status", RESOURCE).stdout
    # A piece under way (at most 1 MiB, rate-limited) ends; then nothing more.
    sent = _settled_increment_bytes(lab)
    time.sleep(2.0)
    st = lab.control("alpha")
    assert st["incr_bytes_sent"] == sent, "increment data went out while paused"
    assert st["out_of_sync_bytes"] > 0 and not _same_images(lab)

    r = lab.duplex("alpha", "resume-sync", RESOURCE)
    assert "sync resumed" in r.stdout, r.stdout
    lab.wait(lambda: _drained(lab), "the full sync to finish", timeout=180)
    assert _same_images(lab)
    assert "sync paused" not in (lab.control("alpha")["reason"] or "")


def test_outdate_marks_a_disconnected_secondary_until_it_caught_up(make_lab):
    lab = _pair(make_lab)
    assert "Primary" in _refused(lab, "alpha", "outdate", RESOURCE)
    err = _refused(lab, "beta", "outdate", RESOURCE)
    assert "connected" in err and "duplex disconnect r0" in err, err

    lab.duplex("beta", "disconnect", RESOURCE)
    r = lab.duplex("beta", "outdate", RESOURCE)
    assert "Outdated" in r.stdout, r.stdout
    assert lab.control("beta")["disk"] == "Outdated"
    assert load_metadata(lab.meta["beta"], RESOURCE).outdated  # persisted
    err = _refused(lab, "beta", "promote", RESOURCE)
    assert "Outdated" in err and "--force" in err, err

    _write(lab.uri, _random_writes(10, lab.size))
    lab.duplex("beta", "connect", RESOURCE)
    lab.wait(lambda: _drained(lab), "beta to catch up")
    assert _same_images(lab)
    lab.wait(lambda: not load_metadata(lab.meta["beta"], RESOURCE).outdated,
             "the outdated mark to clear")
    assert lab.control("beta")["disk"] != "Outdated"

    # A stopped secondary is outdated in its metadata (fencing a dead host's peer).
    lab.duplex("beta", "down", RESOURCE, timeout=60)
    lab.duplex("beta", "outdate", RESOURCE)
    assert load_metadata(lab.meta["beta"], RESOURCE).outdated
    err = _refused(lab, "beta", "promote", RESOURCE)
    assert "Outdated" in err, err
