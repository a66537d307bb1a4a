"""The secondary never fails silently (issue 10): an image that cannot be
written (ENOSPC on a tiny tmpfs) is a named disk state that reaches
status and the primary's ACKs, applying resumes from the journal once
there is room, the image stays the in-order prefix; promote gives up
with the cause after --timeout; every thread that raises is a fault in
status; a failed session leaves no socket open; the secret file is
checked before the secondary listens.

A real Secondary (metadata, journal, pending queue, C applier) on files;
no primary: records are fed to its reader-side calls, and a fake link
collects its ACKs."""
from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from _secondary_helpers import fill, first_diff, prefix_images, rec
from replicator.config import ConfigError, load_config
from replicator.metadata import create_metadata, load_metadata
from replicator.node import create_node_files
from replicator.promote import PromoteError, promote_running
from replicator.protocol.messages import Data, Tokens, VerifyReq
from replicator.secondary import daemon as daemon_mod
from replicator.secondary.daemon import Secondary, SecondaryError
from replicator.secondary.journal import Journal
from replicator.status import format_status
from fixtures.polling import eventually

REPO = Path(__file__).resolve().parents[2]
SIZE = 4 << 20
REC = 64 << 10          # one write: a track
N = 24                  # writes in the history
TMPFS = 2 << 20         # the image's filesystem: room for 32 writes, N fit


def _wait(pred, what: str, timeout: float = 10.0):
    return eventually(pred, what, timeout)


@pytest.fixture
def tmpfs(tmp_path):
    """A TMPFS-byte tmpfs (root: the tests run as root); always unmounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS}", "duplex-test", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _config(tmp: Path, image: Path, port: int = 7789) -> Path:
    secret = tmp / "r0.secret"
    secret.write_text("secret\n")
    os.chmod(secret, 0o600)
    with open(image, "wb") as f:
        f.truncate(SIZE)  # sparse: its blocks come from the tmpfs as it is written
    with open(tmp / "alpha.img", "wb") as f:
        f.truncate(SIZE)
    path = tmp / "duplex.toml"
    path.write_text(f"""
[resource.r0]
secret-file = "{secret}"
journal-size = "8MiB"
ring-size = "1MiB"
al-extent-size = "1MiB"
[resource.r0.on.alpha]
address = "127.0.0.1:{port + 1}"
device = "{tmp}/alpha.img"
meta-dir = "{tmp}/meta-alpha"
export = "unix:{tmp}/alpha.nbd"
[resource.r0.on.beta]
address = "127.0.0.1:{port}"
device = "{image}"
meta-dir = "{tmp}/meta-beta"
export = "unix:{tmp}/beta.nbd"
""")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_beta(tmp: Path, image: Path, port: int = 7789):
    cfg_path = _config(tmp, image, port)
    cfg = load_config(cfg_path)
    res = cfg.resource("r0")
    node = res.node("beta")
    md = create_metadata(node.meta_dir, "r0", "beta", SIZE, res.track_size, assume_clean=True)
    create_node_files(cfg, res, node, md)
    return cfg_path


class FakeLink:
    """What the daemon needs of a PeerLink to send ACKs to it."""

    def __init__(self):
        self.acks: list[tuple] = []
        self.closed = False
        self.error = None
        self.peer_name = "alpha"

    def alive(self) -> bool:
        return not self.closed

    def set_timeouts(self, ping_interval: float, ping_timeout: float) -> None:
        pass

    def heard_ago(self) -> float:
        return 0.0

    def send_ack(self, journaled, applied, disk=None, reason=""):
        self.acks.append((journaled, applied, disk, reason))

    def send(self, msg):
        pass

    def close(self, reason=""):
        self.closed = True


def _history():
    return [rec(s, (s - 1) * REC, fill(s, REC)) for s in range(1, N + 1)]


def _feed(sec: Secondary, recs) -> None:
    """As a reader would: TOKENS, then DATA, then group commit and ack."""
    sec._on_tokens(Tokens(b"".join(r.raw[:48] for r in recs)))
    sec._on_data(Data(memoryview(b"".join(r.raw for r in recs))))
    sec._commit_received()


def _ballast(mnt: Path, leave: int) -> Path:
    """Fill the tmpfs but *leave* bytes."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    path = mnt / "ballast"
    with open(path, "wb") as f:
        f.write(b"\xbb" * max(0, free - leave))
    return path


@pytest.fixture
def beta(tmp_path, tmpfs, monkeypatch):
    """An opened Secondary whose image lives on the tiny tmpfs, with its
    applier running (supervised, as start() runs it) and a fake link."""
    monkeypatch.setattr(daemon_mod, "APPLY_RETRY", (0.05, 0.2), raising=False)
    cfg = _make_beta(tmp_path, tmpfs / "beta.img")
    sec = Secondary.open(str(cfg), "r0", "beta")
    link = FakeLink()
    sec.links.add(link)
    applier = threading.Thread(target=sec._apply_loop, name="duplex-apply", daemon=True)
    applier.start()
    try:
        yield sec, link, tmpfs
    finally:
        sec._stop.set()
        sec._apply_wake.set()
        if hasattr(sec, "_apply_retry"):
            sec._apply_retry.set()
        applier.join(10)
        sec.journal.close()
        os.close(sec.fd)
        if sec.claim is not None:
            sec.claim.close()


def _image(sec) -> bytes:
    data = os.pread(sec.fd, SIZE, 0)
    return data + bytes(SIZE - len(data))


def _failed(sec):
    st = sec.status()
    return st if st["disk"] == "Failed" else None


def test_enospc_is_a_named_disk_state_and_applying_resumes_when_there_is_room(beta):
    sec, link, mnt = beta
    hist = _history()
    _feed(sec, hist[:4])
    _wait(lambda: sec.status()["seq"]["applied"] == 4, "the first 4 writes applied")
    ballast = _ballast(mnt, leave=2 * REC)
    _feed(sec, hist[4:])
    st = _wait(lambda: _failed(sec), "disk Failed")
    assert st["seq"]["applied"] == 4, st["seq"]
    image_path = sec.node.device
    # Named: the seq that failed, the error, the image.
    why = f"applying seq 5 (run 5..{N}): No space left on device (image {image_path})"
    assert st["apply"]["error"] == why
    assert st["reason"].startswith(why) and "duplex connect r0" in st["reason"], st["reason"]
    text = format_status(st)
    assert "disk Failed" in text and why in text, text
    # Journaling goes on: every record is journaled and acked as such.
    assert st["seq"]["journaled"] == N
    # The primary is told, in the ACK, with the same reason.
    _wait(lambda: any(a[2] == "Failed" for a in link.acks), "an ACK saying disk Failed")
    failed_ack = [a for a in link.acks if a[2] == "Failed"][-1]
    assert failed_ack[0] == N and failed_ack[3] == why
    # The image holds the applied prefix; nothing far past it got there.
    want4 = prefix_images(SIZE, [(r.token, r.raw) for r in hist])[4]
    img = _image(sec)
    assert img[:4 * REC] == want4[:4 * REC], first_diff(img[:4 * REC], want4[:4 * REC])
    assert img[8 * REC:] == bytes(SIZE - 8 * REC)

    ballast.unlink()  # room again: the backoff retry finds it by itself
    _wait(lambda: sec.status()["seq"]["applied"] == N and sec.status()["disk"] != "Failed",
          "applying to resume")
    want = prefix_images(SIZE, [(r.token, r.raw) for r in hist])[N]
    got = _image(sec)
    assert got == want, first_diff(got, want)
    st = sec.status()
    assert st["apply"]["error"] is None and "No space" not in (st["reason"] or "")
    # The primary hears that the disk is back (a disk state with no reason).
    _wait(lambda: link.acks and link.acks[-1][2] not in (None, "Failed") or
          any(a[2] not in (None, "Failed") for a in link.acks), "an ACK saying the disk recovered")


def test_connect_retries_a_failed_apply_at_once(beta, monkeypatch):
    sec, _link, mnt = beta
    monkeypatch.setattr(daemon_mod, "APPLY_RETRY", (0.05, 60.0))
    ballast = _ballast(mnt, leave=4 * REC)
    hist = _history()[:12]
    _feed(sec, hist)
    _wait(lambda: _failed(sec), "disk Failed")
    sec._retry_delay = 60.0  # from the next failure on, the backoff waits a minute
    time.sleep(0.5)          # (a retry under way fails once more, then waits)
    sec._retry_at = time.monotonic() + 60
    ballast.unlink()
    time.sleep(0.3)
    assert sec.status()["disk"] == "Failed"  # no retry yet
    reply = sec.connect_cmd()
    assert reply["apply_retried"] is True
    _wait(lambda: sec.status()["seq"]["applied"] == 12, "applying to resume after connect", 5)
    want = prefix_images(SIZE, [(r.token, r.raw) for r in hist])[12]
    got = _image(sec)
    assert got[:12 * REC] == want[:12 * REC], first_diff(got, want)


def test_a_failed_run_is_applied_again_never_skipped(beta, monkeypatch):
    """Writes that fail after part of a run went to the image: the whole run
    is applied again from the journal (the image ends as the prefix, byte
    for byte), and applied never moves past a write that failed."""
    sec, _link, mnt = beta
    ballast = _ballast(mnt, leave=3 * REC + REC // 2)  # the 4th write fails half-way
    hist = _history()[:8]
    _feed(sec, hist)
    st = _wait(lambda: _failed(sec), "disk Failed")
    assert st["seq"]["applied"] <= 3, st["seq"]
    ballast.unlink()
    _wait(lambda: sec.status()["seq"]["applied"] == 8, "applying to resume")
    want = prefix_images(SIZE, [(r.token, r.raw) for r in hist])[8]
    got = _image(sec)
    assert got == want, first_diff(got, want)


def test_promote_gives_up_after_its_timeout_naming_the_cause(beta):
    sec, _link, mnt = beta
    _ballast(mnt, leave=2 * REC)
    _feed(sec, _history()[:10])
    _wait(lambda: _failed(sec), "disk Failed")
    sec.links.clear()  # the primary is gone: failover
    t0 = time.monotonic()
    with pytest.raises(PromoteError) as ei:
        promote_running(sec, timeout=1.5)
    took = time.monotonic() - t0
    assert 1.4 <= took < 5, took
    msg = str(ei.value)
    assert "cannot promote" in msg and "gave up after 1.5 s" in msg, msg
    assert f"No space left on device (image {sec.node.device})" in msg, msg
    assert "free space" in msg and "--timeout" in msg, msg
    assert sec.receiving and sec.md.role == "Secondary"  # still a secondary
    # What it waits for, every few seconds, while it waits.
    lines = []
    with pytest.raises(SecondaryError):
        sec.apply_all(timeout=2.5, progress=lines.append)
    assert lines and lines[0].startswith("r0: promote: applied through seq 0 of 10 journaled, "
                                         "and cannot apply seq 1 (run 1..10): No space left "
                                         "on device (image "), lines


def _journal_with(md_dir: Path, node_uuid: str, recs) -> None:
    with Journal.open(str(md_dir / "journal"), bytes.fromhex(node_uuid)) as j:
        j.append_tokens(b"".join(r.raw[:48] for r in recs))
        j.append(b"".join(r.raw for r in recs))
        j.commit()


def test_offline_promote_with_a_full_image_disk_fails_in_one_line_after_timeout(tmp_path, tmpfs):
    cfg = _make_beta(tmp_path, tmpfs / "beta.img")
    md = load_metadata(tmp_path / "meta-beta", "r0")
    _journal_with(tmp_path / "meta-beta", md.node_uuid, _history()[:10])
    _ballast(tmpfs, leave=2 * REC)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "replicator.cli", "--config", str(cfg), "--node",
                        "beta", "promote", "r0", "--timeout", "2"],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    took = time.monotonic() - t0
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    errors = [l for l in r.stderr.splitlines() if "cannot promote" in l]
    assert len(errors) == 1, r.stderr
    assert "cannot apply applying seq" not in errors[0]
    assert "No space left on device" in errors[0] and str(tmpfs / "beta.img") in errors[0], errors
    assert "free space" in errors[0], errors
    assert "r0: promote: applied through seq 0, and cannot apply seq 1 (run 1..10): No space " \
        "left on device" in r.stderr, r.stderr  # the progress line, before the error
    assert took < 30, took
    assert load_metadata(tmp_path / "meta-beta", "r0").role == "Secondary"  # nothing promoted


# -- supervision: each thread that raises is a fault in status ------------------

@pytest.fixture
def running(tmp_path, monkeypatch):
    """A started Secondary on a free local port (listener, committer,
    applier under its supervisor); stopped afterwards."""
    port = _free_port()
    cfg = _make_beta(tmp_path, tmp_path / "beta.img", port)
    sec = Secondary.open(str(cfg), "r0", "beta")
    started = []

    def start():
        sec.start()
        started.append(True)
        return sec
    try:
        yield start, sec, port
    finally:
        if sec._stop.is_set():
            pass  # stopped already (run_secondary does)
        elif started:
            sec.stop()
        else:
            sec.journal.close()
            os.close(sec.fd)
            if sec.claim is not None:
                sec.claim.close()


def _fault(sec, thread: str):
    for f in sec.status()["faults"]:
        if f["thread"] == thread:
            return f
    return None


def _boom(*_a, **_k):
    raise RuntimeError("injected fault")


@pytest.mark.parametrize("thread,method,state", [
    ("duplex-apply", "apply_next_run", "restarting"),
    ("duplex-commit", "_commit_received", "restarting"),
])
def test_a_loop_thread_that_raises_is_named_in_status_and_restarted(running, monkeypatch,
                                                                    thread, method, state):
    start, sec, _port = running
    calls = []
    real = getattr(sec, method)

    def once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(*a, **k)
    monkeypatch.setattr(sec, method, once)
    if method == "apply_next_run":
        sec.journaled = 1  # something to apply, so the loop calls it
    start()
    f = _wait(lambda: _fault(sec, thread), f"a fault of {thread} in status", 5)
    assert f["state"] == state and f["error"] == "RuntimeError: injected fault", f
    text = format_status(sec.status())
    assert f"thread {thread} {state}: RuntimeError: injected fault" in text, text
    _wait(lambda: len(calls) >= 2, f"{thread} to run again", 5)


def test_the_listener_that_raises_is_restarted_and_named(running):
    start, sec, _port = running
    start()
    real = sec._listener
    calls = []

    class Exploding:
        def accept(self):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected fault")
            return real.accept()

        def close(self):
            real.close()
    sec._listener = Exploding()
    f = _wait(lambda: _fault(sec, "duplex-listen"), "a fault of duplex-listen", 5)
    assert f["state"] == "restarting" and "injected fault" in f["error"]
    _wait(lambda: len(calls) >= 2, "the listener to accept again", 5)


def test_a_handshake_that_raises_is_a_fault_and_closes_its_socket(running, monkeypatch):
    start, sec, port = running
    monkeypatch.setattr(daemon_mod.PeerLink, "accept", _boom)
    start()
    c = socket.create_connection(("127.0.0.1", port))
    try:
        f = _wait(lambda: _fault(sec, "duplex-handshake"), "a handshake fault", 5)
        assert f["state"] == "failed" and f["error"] == "RuntimeError: injected fault"
        c.settimeout(5)
        assert c.recv(1) == b""  # the secondary closed its side
    finally:
        c.close()


def test_reap_and_verify_threads_that_raise_are_faults(running, monkeypatch):
    start, sec, port = running
    link = FakeLink()
    monkeypatch.setattr(daemon_mod.PeerLink, "accept", lambda *a, **k: link)
    link.peer_state = type("PS", (), {"flags": 0})()
    monkeypatch.setattr(sec, "_adopt", lambda ps: None)
    monkeypatch.setattr(sec, "_follow", lambda l: None)
    monkeypatch.setattr(sec, "_reap", _boom)
    monkeypatch.setattr(sec, "_answer_verify", _boom)
    start()
    c = socket.create_connection(("127.0.0.1", port))
    try:
        f = _wait(lambda: _fault(sec, "duplex-reap"), "a reap fault", 5)
        assert f["state"] == "failed" and "injected fault" in f["error"]
        sec._on_event(link, VerifyReq(1, 0, 1, 0))
        f = _wait(lambda: _fault(sec, "duplex-verify"), "a verify fault", 5)
        assert f["state"] == "failed" and "injected fault" in f["error"]
    finally:
        c.close()


# -- sockets of failed sessions are closed --------------------------------------

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_twenty_failed_sessions_leave_no_socket_open(running):
    """Real sessions (PeerLink both ways, in this process): each one
    authenticates, exchanges STATE, then the primary hangs up. The
    secondary's reaper must close its socket: the process's descriptor
    count comes back to where it was."""
    from replicator.peerlink import PeerLink
    from replicator.protocol.messages import State

    start, sec, port = running
    start()
    res = sec.resource
    state = State(b"\x11" * 16, b"\x22" * 16, SIZE, res.track_size, "primary", "UpToDate")
    secret = res.secret()
    time.sleep(0.3)
    # No garbage collection meanwhile: a socket must be closed because the
    # daemon closes it, not because a cycle holding it happened to be freed.
    gc.collect()
    gc.disable()
    try:
        before = _open_fds()
        for i in range(20):
            link = PeerLink.connect(("127.0.0.1", port), role="primary", resource="r0",
                                    node="alpha", secret=secret, local_state=state)
            _wait(lambda: sec.links, f"session {i} to be established on the secondary", 5)
            link.close("test: the primary goes away")
            _wait(lambda: not sec.links, f"session {i} to be reaped", 5)
        _wait(lambda: _open_fds() <= before, f"descriptors back to {before} (now {_open_fds()})",
              5)
    finally:
        gc.enable()
    assert "closed" in (sec.last_error or ""), sec.last_error  # and why is kept for status


# -- the secret file ------------------------------------------------------------

@pytest.mark.parametrize("mode,content,expected", [
    (0o644, "x", "is readable by every user (mode 0644); run chmod 600"),
    (0o640, "x", "is open to its group (mode 0640); run chmod 600"),
    (0o600, "", "is empty"),
    (None, "", "does not exist"),
])
def test_start_refuses_a_bad_secret_file_before_it_listens(running, tmp_path, mode, content,
                                                            expected):
    start, sec, port = running
    secret = tmp_path / "r0.secret"
    if mode is None:
        secret.unlink()
    else:
        secret.write_text(content)
        os.chmod(secret, mode)
    with pytest.raises(SecondaryError) as ei:
        start()
    msg = str(ei.value)
    assert msg.startswith("r0: cannot start the secondary: ") and str(secret) in msg
    assert expected in msg, msg
    assert "\n" not in msg
    with socket.socket() as c:  # nothing listens
        assert c.connect_ex(("127.0.0.1", port)) != 0


def test_the_secret_is_read_again_at_each_handshake(running, tmp_path, monkeypatch):
    start, sec, port = running
    start()
    secret = tmp_path / "r0.secret"
    os.chmod(secret, 0o644)
    seen = []
    monkeypatch.setattr(daemon_mod.PeerLink, "accept",
                        lambda sock, **kw: seen.append(kw["secret"]) or _boom())
    c = socket.create_connection(("127.0.0.1", port))
    c.close()
    _wait(lambda: "is readable by every user" in (sec.last_error or ""), "the refusal", 5)
    assert not seen  # no handshake with a bad secret
    os.chmod(secret, 0o600)
    secret.write_text("fixed\n")
    c = socket.create_connection(("127.0.0.1", port))
    c.close()
    _wait(lambda: seen, "a handshake with the fixed secret", 5)
    assert seen == [b"fixed"]


def test_read_secret_names_the_key_and_the_fix(tmp_path):
    from replicator.config import read_secret  # imported here: the other tests run without it

    p = tmp_path / "s"
    p.write_text("k\n")
    os.chmod(p, 0o600)
    assert read_secret(str(p), "cfg: resource.r0.secret-file") == b"k"
    os.chmod(p, 0o660)
    with pytest.raises(ConfigError, match=r"^cfg: resource.r0.secret-file: .* is open to its "
                                          r"group \(mode 0660\); run chmod 600 "):
        read_secret(str(p), "cfg: resource.r0.secret-file")


def test_verify_on_the_secondary_says_where_verify_runs(running):
    _start, sec, _port = running
    with pytest.raises(SecondaryError) as ei:
        sec.control.handlers["verify"](fix=False)
    assert str(ei.value) == ("r0: node beta is the Secondary; `duplex verify` compares both "
                             "sides from the primary: run `duplex verify r0` on alpha")


# -- a failed fdatasync of the image: the journal writes it again -------------

def test_a_failed_image_fdatasync_frees_no_journal_and_writes_the_records_again(beta, monkeypatch):
    """After fdatasync of the image failed, the kernel may have dropped the
    pages it could not write, and the next fdatasync would not say so:
    nothing is checkpointed any more (the journal keeps every record since
    the last good one), and once the device answers, a retry writes every
    one of them again from the journal before anything is checkpointed."""
    sec, link, _mnt = beta
    real = os.fdatasync
    failing = [True]

    def fdatasync(fd):
        if fd == sec.fd and failing[0]:
            raise OSError(5, "Input/output error")
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    hist = _history()
    _feed(sec, hist[:6])
    st = _wait(lambda: _failed(sec), "disk Failed after the fdatasync error")
    assert st["apply"]["error"] == (
        f"fdatasync of image {sec.node.device} failed: Input/output error; the journal keeps "
        f"every record since seq 0, and each retry writes them all again"), st["apply"]
    assert sec.restart_needed == ""  # the journal has every record: no restart
    assert any(a[2] == "Failed" and "each retry" in a[3] for a in link.acks)
    sec.retry_apply()  # still failing: a retry proves nothing, and frees nothing
    time.sleep(0.5)
    assert sec.journal.applied_seq == 0
    assert sec.status()["disk"] == "Failed"
    # The pages the kernel could not write are gone: the image lost them.
    os.pwrite(sec.fd, bytes(6 * REC), 0)
    _feed(sec, hist[6:8])
    failing[0] = False  # the device answers again
    sec.retry_apply()
    _wait(lambda: sec.journal.applied_seq >= 8 and sec.status()["disk"] != "Failed",
          "the records written again and checkpointed")
    want = prefix_images(SIZE, [(r.token, r.raw) for r in hist])[8]
    img = _image(sec)
    assert img[:8 * REC] == want[:8 * REC], first_diff(img[:8 * REC], want[:8 * REC])


def test_up_exits_non_zero_when_only_a_restart_recovers(running, monkeypatch):
    """`duplex up` on the secondary exits 1 (systemd: Restart=on-failure)
    once the image's fdatasync failed while an increment was written in
    place (its data is in no journal to write again from)."""
    import signal
    import threading as th

    from replicator import node as node_mod

    _start, sec, _port = running
    monkeypatch.setattr(Secondary, "open", classmethod(lambda cls, *a, **k: sec))
    cfg = load_config(sec.resource.config_path)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    from replicator.secondary.increments import Increment

    def fail_in_place():
        sec.incr = Increment(1, 0, False)  # an increment being written in place
        sec._sync_failed(OSError(5, "Input/output error"))
    timer = th.Timer(1.0, fail_in_place)
    # Bounded: a node that does not stop by itself gets SIGTERM (and exits 0).
    guard = th.Timer(15.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    guard.start()
    try:
        rc = node_mod.run_secondary(cfg, sec.resource, sec.node)  # starts and stops sec
    finally:
        timer.cancel()
        guard.cancel()
        for s, h in old.items():
            signal.signal(s, h)
    assert rc == 1
    assert "restart the secondary" in sec.restart_needed
