"""nbdkit fixture: C and Python plugins, unix socket and TCP in a namespace."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

from fixtures.leaks import leftovers
from fixtures.nbdkit import NbdkitServer, nbd_connect, start_nbdkit
from fixtures.netns import NetnsPair
from fixtures.processes import FixtureError, ProcessGroup

# A plugin that can only load if nbdkit's embedded Python sees the repo root
# (replicator) and the venv's site-packages (pyroute2 is not a Debian package
# here), as DESIGN §10 requires.
PROBE_PLUGIN = '''
import nbdkit
import pyroute2
import replicator.records

API_VERSION = 2
_disk = bytearray(1 << 20)

def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS

def open(readonly):
    return 1

def get_size(h):
    return len(_disk)

def pread(h, buf, offset, flags):
    buf[:] = _disk[offset:offset + len(buf)]

def pwrite(h, buf, offset, flags):
    _disk[offset:offset + len(buf)] = buf
    # Prove the import is the repository's module, readable back by a client.
    if offset == 0:
        tag = replicator.records.__file__.encode()[:256]
        _disk[4096:4096 + len(tag)] = tag
'''


def test_memory_plugin_serves_writes_back_to_libnbd(nbdkit_server: Callable[..., NbdkitServer]) -> None:
    server = nbdkit_server("memory", "64M")
    h = nbd_connect(server.uri)
    try:
        assert h.get_size() == 64 * 1024 * 1024
        pattern = bytes(range(256)) * 16
        h.pwrite(pattern, 1024 * 1024)
        h.flush()
        assert h.pread(4096, 1024 * 1024) == pattern
        assert h.pread(4096, 0) == bytes(4096)
    finally:
        h.shutdown()


def test_file_plugin_writes_reach_the_image_file(nbdkit_server: Callable[..., NbdkitServer],
                                                  sparse_image: Callable[..., Path]) -> None:
    image = sparse_image(8 * 1024 * 1024)
    server = nbdkit_server("file", str(image))
    h = nbd_connect(server.uri)
    try:
        h.pwrite(b"duplex!\n" * 512, 3 * 4096)
        h.flush()
    finally:
        h.shutdown()
    with open(image, "rb") as f:
        f.seek(3 * 4096)
        assert f.read(4096) == b"duplex!\n" * 512


def test_python_plugin_imports_repo_and_venv_modules(nbdkit_server: Callable[..., NbdkitServer],
                                                      tmp_path: Path) -> None:
    plugin = tmp_path / "probe_plugin.py"
    plugin.write_text(PROBE_PLUGIN)
    server = nbdkit_server(plugin, f"statsfile={tmp_path / 'stats.txt'}", filters=["stats"],
                           options=["--verbose"], name="nbdkit-probe")
    h = nbd_connect(server.uri)
    try:
        h.pwrite(b"x" * 512, 0)
        tag = h.pread(256, 4096).rstrip(b"\0").decode()
    finally:
        h.shutdown()
    repo = Path(__file__).resolve().parents[2]
    assert tag == str(repo / "replicator" / "records.py")
    assert server.peak_rss_bytes() > 0


def test_nbdkit_in_a_namespace_serves_tcp_to_the_other(netns_pair: NetnsPair,
                                                       nbdkit_server: Callable[..., NbdkitServer]) -> None:
    pair = netns_pair
    server = nbdkit_server("memory", "16M", netns=pair.ns_b, tcp=(pair.addr_b, 10809))
    assert server.pid in pair.pids(pair.ns_b)
    assert server.uri == f"nbd://{pair.addr_b}:10809/"
    # A client in the other namespace writes then reads back over the veth.
    client = ("import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
              "h.pwrite(b'over the wire', 512); print(h.pread(13, 512).decode()); h.shutdown()")
    res = pair.run(pair.ns_a, [sys.executable, "-c", client, server.uri], timeout=60)
    assert res.stdout.decode().strip() == "over the wire"


def test_a_plugin_that_fails_to_load_is_reported_with_its_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("raise RuntimeError('plugin refuses: no device configured')\n")
    with ProcessGroup(tmp_path / "logs") as group:
        with pytest.raises(FixtureError) as info:
            start_nbdkit(group, bad, workdir=tmp_path / "run", ready_timeout=30)
    assert "plugin refuses: no device configured" in str(info.value)


def test_stopped_server_leaves_no_process(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path / "logs") as group:
        server = start_nbdkit(group, "memory", ["1M"], workdir=tmp_path / "run")
        assert leftovers(tmp_path).processes == (server.pid,)
    assert leftovers(tmp_path).processes == ()
    assert not server.process.is_running()
