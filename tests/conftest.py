"""Shared pytest fixtures: real processes, network namespaces, nbdkit, block devices.

Every fixture tears down what it made even when the test fails. None skips:
what they need (root, /dev/fuse, nbdkit, nbdfuse) is there on the developers'
machines and in CI (scripts/setup installs it), so a missing piece fails the
test with a message naming it.

The logs of processes a test started are attached to its failure report.

Fixtures (all function-scoped):

- ``procs`` -> :class:`fixtures.processes.ProcessGroup`: ``procs.start(argv,
  name=..., netns=..., env=..., extra_env=...)``; logs in tmp_path/logs.
- ``netns_pair`` -> :class:`fixtures.netns.NetnsPair` (``ns_a``, ``ns_b``,
  ``addr_a``, ``addr_b``, ``run``, ``popen``, ``link_down``, ``link_up``).
- ``nbdkit_server`` -> factory ``(plugin, *args, filters=(), options=(),
  netns=None, tcp=None, extra_env=None, name="nbdkit") -> NbdkitServer``.
- ``nbd_block_device`` -> factory ``(uri, direct_io=True) -> LoopDevice``.
- ``mount_fs`` -> factory ``(device, fstype="ext4", mkfs=True,
  options=()) -> Path`` (the mount point), unmounted at teardown.
- ``sparse_image`` -> factory ``(size, name="disk.img", dir=None) -> Path``.
- ``shm_dir`` -> a fresh directory on /dev/shm, removed at teardown.
- ``make_lab`` -> factory ``(**Lab kwargs) -> Lab``: a Duplex pair between
  the two namespaces of ``netns_pair``; at teardown each lab's
  ``teardown_hooks`` run, then its processes stop.
"""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterator

import pytest

# tests/ on sys.path so test modules and this file can `import fixtures...`
# whatever pytest's import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from fixtures import blockdev as _blockdev  # noqa: E402
from fixtures.duplex_lab import Lab  # noqa: E402
from fixtures.images import make_sparse_image, shm_directory  # noqa: E402
from fixtures.nbdkit import NbdkitServer, start_nbdkit  # noqa: E402
from fixtures.netns import NetnsPair, list_namespaces, remove_namespace, remove_stale_namespaces  # noqa: E402
from fixtures.processes import FixtureError, ProcessGroup  # noqa: E402

# pytester: tests/infra runs an inner session to prove teardown after failures.
pytest_plugins = ["pytester"]

_GROUPS_ATTR = "_dpx_process_groups"

# Fixtures that start processes or need root, namespaces, devices, nbdkit or
# fuse: a test using any of them (directly or through another fixture) is
# marked `system`, so `make unit` (-m "not system") leaves it to `make test`.
# The last three are fixtures of single test modules (a small tmpfs, a loop
# device: root). A test that needs root some other way carries
# @pytest.mark.system itself.
SYSTEM_FIXTURES = frozenset({"procs", "netns_pair", "nbdkit_server", "nbd_block_device",
                             "mount_fs", "make_lab", "tmpfs", "loop_device", "loop_ext4",
                             "xfs_dir"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses a SYSTEM_FIXTURES fixture `system`."""
    for item in items:
        if SYSTEM_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the logs of the test's processes to a failed setup or call report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for group in getattr(item, _GROUPS_ATTR, ()):
            for title, text in group.logs():
                report.sections.append((f"process log: {title}", text))


@pytest.fixture(scope="session", autouse=True)
def _no_namespaces_left_behind() -> Iterator[None]:
    """Remove namespaces of dead earlier runs; fail the session if ours leak."""
    if os.geteuid() == 0:
        remove_stale_namespaces()
    yield
    if os.geteuid() != 0:
        return
    mine = list_namespaces(f"dpx-{os.getpid()}-")
    for name in mine:
        remove_namespace(name)
    if mine:
        pytest.fail(f"network namespaces left behind by this test run: {mine}")


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessGroup]:
    """Start background processes with logged output; all stopped at teardown."""
    group = ProcessGroup(tmp_path / "logs")
    groups = getattr(request.node, _GROUPS_ATTR, [])
    groups.append(group)
    setattr(request.node, _GROUPS_ATTR, groups)
    try:
        yield group
    finally:
        group.stop_all()


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root; run the tests as root (`sudo make test`)",
                    pytrace=False)


@pytest.fixture
def netns_pair(procs: ProcessGroup) -> Iterator[NetnsPair]:
    """Two network namespaces joined by a veth pair, deleted at teardown."""
    _require_root("netns_pair (network namespaces)")
    pair = NetnsPair.create(procs)
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture
def nbdkit_server(procs: ProcessGroup) -> Iterator[Callable[..., NbdkitServer]]:
    """Factory: start nbdkit with a plugin, ready to accept; stopped at teardown."""
    servers: list[NbdkitServer] = []
    # A short directory for sockets: sun_path is 108 bytes and tmp_path can be long.
    with shm_directory("dpx-nbd-") as sockdir:

        def start(plugin: str | os.PathLike, *args: str, **kwargs) -> NbdkitServer:
            server = start_nbdkit(procs, plugin, args, workdir=sockdir, **kwargs)
            servers.append(server)
            return server

        try:
            yield start
        finally:
            for server in reversed(servers):
                server.stop()


@pytest.fixture
def nbd_block_device(procs: ProcessGroup, tmp_path: Path) -> Iterator[Callable[..., _blockdev.LoopDevice]]:
    """Factory: an NBD URI as /dev/loopN (nbdfuse + losetup); detached at teardown."""
    try:
        _blockdev.require_block_device_support()
    except FixtureError as e:
        pytest.fail(str(e), pytrace=False)
    devices: list[_blockdev.LoopDevice] = []

    def attach(uri: str, **kwargs) -> _blockdev.LoopDevice:
        dev = _blockdev.attach_loop(procs, uri, tmp_path / "fuse", **kwargs)
        devices.append(dev)
        return dev

    try:
        yield attach
    finally:
        errors = []
        for dev in reversed(devices):
            try:
                dev.detach()
            except Exception as e:
                errors.append(str(e))
        if errors:
            raise FixtureError("; ".join(errors))


@pytest.fixture
def mount_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: mkfs (optional) and mount a device; unmounted at teardown."""
    with ExitStack() as stack:
        count = 0

        def mount(device: str, fstype: str = "ext4", *, mkfs: bool = True,
                  options: tuple[str, ...] = ()) -> Path:
            nonlocal count
            if mkfs:
                _blockdev.mkfs(device, fstype)
            point = tmp_path / f"mnt{count}"
            count += 1
            return stack.enter_context(_blockdev.mounted(device, point, fstype=fstype,
                                                         options=options))

        yield mount


@pytest.fixture
def sparse_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a sparse zero-filled image file of ``size`` bytes (removed with tmp_path)."""

    def make(size: int, name: str = "disk.img", dir: Path | None = None) -> Path:
        return make_sparse_image((dir or tmp_path) / name, size)

    return make


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh directory on tmpfs (/dev/shm), removed at teardown."""
    with shm_directory() as path:
        yield path


@pytest.fixture
def make_lab(netns_pair: NetnsPair, procs: ProcessGroup, tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """Factory: a Lab (config, images, metadata dirs) between the two
    namespaces of ``netns_pair``; torn down even when the test fails."""
    labs: list[Lab] = []

    def make(**kwargs) -> Lab:
        lab = Lab(tmp_path / f"lab{len(labs)}", procs, netns_pair.ns_a, netns_pair.ns_b,
                  netns_pair.addr_a, netns_pair.addr_b, **kwargs)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        errors = []
        for lab in labs:
            for hook in lab.teardown_hooks:
                try:
                    hook()
                except Exception as e:
                    errors.append(str(e))
            lab.stop()
        if errors:
            raise FixtureError("lab teardown: " + "; ".join(errors))
