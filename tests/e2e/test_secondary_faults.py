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
    human = lab.duplex("beta", "status", "r0").stdout
    assert "disk Failed" in human and "No space left on device" in human, human

    alpha = lab.wait(lambda: (s := lab.status("alpha")) and s["peer"].get("disk") == "Failed" and s,
                     "alpha to see its peer's disk Failed", timeout=30)
    text = str(alpha)
    assert "No space left on device" in text and image in text, alpha
    human = lab.duplex("alpha", "status", "r0").stdout
    assert "Failed" in human and "No space left on device" in human, human

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
