"""A secondary whose image filesystem fills up (ENOSPC while applying),
in a real lab: both sides name it in status, the secondary keeps
journaling, and once space is freed applying resumes by itself and the
images match. Also: `duplex verify` on the secondary says where it runs."""
from __future__ import annotations

import os
import subprocess

import nbd
import pytest

SIZE = 16 << 20
CHUNK = 256 << 10
TMPFS = 24 << 20


@pytest.fixture
def small_fs(tmp_path):
    """A TMPFS-byte tmpfs for beta's image; unmounted after the lab stops
    (pytest tears fixtures down in reverse: request it before make_lab)."""
    mnt = tmp_path / "beta-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS}", "duplex-e2e", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt, leave: int):
    st = os.statvfs(mnt)
    path = mnt / "ballast"
    with open(path, "wb") as f:
        f.write(b"\xbb" * max(0, st.f_bavail * st.f_frsize - leave))
    return path


def test_a_full_image_filesystem_is_named_on_both_sides_and_applying_resumes(small_fs, make_lab):
    lab = make_lab(size=SIZE)
    lab.image["beta"] = small_fs / "beta.img"
    with open(lab.image["beta"], "wb") as f:
        f.truncate(SIZE)  # sparse: blocks come from the small tmpfs as it is written
    lab.write_config()
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    lab.wait(lambda: lab.status("alpha").get("peer", {}).get("disk") in ("UpToDate", "Consistent"),
             "the two sides to connect", timeout=30)
    ballast = _fill(small_fs, leave=1 << 20)

    h = nbd.NBD()
    h.connect_uri(lab.uri)
    try:
        for i in range(SIZE // CHUNK // 2):  # 8 MiB of distinct data: more than the room left
            h.pwrite(bytes([i + 1]) * CHUNK, i * CHUNK)
        h.flush()
    finally:
        h.shutdown()

    image = str(lab.image["beta"])
    beta = lab.wait(lambda: (s := lab.status("beta")) and s.get("disk") == "Failed" and s,
                    "beta's disk to be Failed", timeout=30)
    assert "No space left on device" in beta["reason"] and image in beta["reason"], beta
    assert "applying seq " in beta["reason"], beta["reason"]
    assert beta["seq"]["journaled"] > beta["seq"]["applied"], beta["seq"]  # journaling went on
    human = lab.duplex("beta", "status", "r0", "--verbose").stdout
    assert "disk Failed" in human and "No space left on device" in human, human

    alpha = lab.wait(lambda: (s := lab.status("alpha")) and s["peer"].get("disk") == "Failed" and s,
                     "alpha to see its peer's disk Failed", timeout=30)
    text = str(alpha)
    assert "No space left on device" in text and image in text, alpha
    human = lab.duplex("alpha", "status", "r0").stdout  # the one line says it too
    assert "peer-disk:Failed" in human and "No space left on device" in human, human

    ballast.unlink()  # room again: the secondary retries by itself (backoff)
    lab.wait_drained(timeout=60)
    beta = lab.status("beta")
    assert beta["disk"] != "Failed" and "No space" not in (beta.get("reason") or ""), beta
    lab.wait(lambda: lab.status("alpha")["peer"].get("disk") != "Failed",
             "alpha to see the peer's disk recovered", timeout=20)
    assert lab.digest("beta") == lab.digest("alpha")
    assert "Traceback" not in lab.secondary.log_text()

    r = lab.duplex("beta", "verify", "r0", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "run `duplex verify r0` on alpha" in r.stderr, r.stderr
    assert "unknown command" not in r.stderr, r.stderr

    # Full again, and the primary is lost: promote must not hang on the disk.
    ballast = _fill(small_fs, leave=256 << 10)
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    try:
        for i in range(SIZE // CHUNK // 2, SIZE // CHUNK):  # the other half: new blocks
            h.pwrite(bytes([i + 1]) * CHUNK, i * CHUNK)
        h.flush()
    finally:
        h.shutdown()
    lab.wait(lambda: lab.status("beta").get("disk") == "Failed", "beta's disk Failed again",
             timeout=30)
    lab.kill_primary()
    lab.wait(lambda: lab.status("beta").get("connection") != "Connected",
             "beta to notice the primary is gone", timeout=30)
    r = lab.duplex("beta", "promote", "r0", "--timeout", "4", check=False, timeout=60)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    err = [l for l in r.stderr.splitlines() if "error" in l]
    assert len(err) == 1 and "cannot promote" in err[0] and "gave up after 4 s" in err[0], r.stderr
    assert "No space left on device" in err[0] and image in err[0], err
    assert "r0: promote: applied through seq" in r.stderr, r.stderr  # progress while it waited
    assert lab.status("beta")["role"] == "Secondary"
    ballast.unlink()
    r = lab.duplex("beta", "promote", "r0", "--timeout", "30", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
