"""The conftest fixtures clean up even when the test using them fails.

Runs an inner pytest session (pytester, in a subprocess) whose test uses
every fixture, records what it made, then fails; the outer test asserts the
failure report carries the process logs and nothing was left behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures.leaks import leftovers

TESTS_DIR = Path(__file__).resolve().parents[1]

INNER_TEST = '''
import json, os
from pathlib import Path

RECORD = Path(os.environ["DPX_RECORD"])

def test_uses_everything_then_fails(netns_pair, nbdkit_server, nbd_block_device,
                                    mount_fs, sparse_image, shm_dir):
    image = sparse_image(32 * 1024 * 1024)
    server = nbdkit_server("file", str(image))
    dev = nbd_block_device(server.uri)
    mnt = mount_fs(dev.path, "ext4")
    (mnt / "f").write_text("x")
    sleeper = netns_pair.popen(netns_pair.ns_a, ["sleep", "600"])
    RECORD.write_text(json.dumps({
        "namespaces": [netns_pair.ns_a, netns_pair.ns_b],
        "pids": [server.pid, sleeper.pid, dev.nbdfuse.pid],
        "loop": dev.path, "fuse": str(dev.fuse_dir), "mnt": str(mnt),
        "shm": str(shm_dir), "tmp": str(image.parent),
    }))
    assert False, "deliberate failure"
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_fixtures_clean_up_after_a_failing_test(pytester: pytest.Pytester, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "record.json"
    pytester.makepyfile(test_inner=INNER_TEST)
    monkeypatch.setenv("DPX_RECORD", str(record))
    # The inner session loads tests/conftest.py as a plugin named "conftest".
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = pytester.runpytest_subprocess("-p", "conftest", "-p", "no:cacheprovider",
                                           timeout=240)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "deliberate failure" in out
    assert "process log: nbdkit" in out and "process log: nbdfuse" in out, out
    made = json.loads(record.read_text())
    for pid in made["pids"]:
        assert not _alive(pid), f"pid {pid} survived teardown"
    left = leftovers(made["tmp"], tuple(made["namespaces"]))
    assert left.is_empty(), f"left behind: {left}"
    assert not Path(made["shm"]).exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert made["mnt"] not in mounts and made["fuse"] not in mounts
