"""User mistakes and full or read-only disks, tried as a user would: each
case runs ``python -m replicator.cli ...`` in a subprocess and checks that
the command fails with one line naming the file or path, exits non-zero,
and that no Python traceback reaches the user (issue 10, items 3, 6, 9, 12).

Full and read-only meta-dirs are small tmpfs mounts made by the test
(root ignores file modes, so chmod cannot make a directory read-only for
it); every mount is undone in a finalizer, also when the test fails.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import nbd
import pytest

from fixtures.duplex_lab import DUPLEX, RESOURCE, Lab, duplex_env
from fixtures.processes import ProcessGroup

from replicator.metadata import MetaPaths, load_metadata

MiB = 1 << 20


def _free_port() -> int:
    """A TCP port nothing listens on now (the lab runs on 127.0.0.1, beside
    other tests' labs, so it must not take the default port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mount_tmpfs(point: Path, size: str) -> None:
    point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)],
                   check=True)


def _umount(point: Path) -> None:
    if os.path.ismount(point):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Factory ``(name, size) -> mount point``: a tmpfs of *size* under
    tmp_path; unmounted at teardown."""
    points: list[Path] = []

    def make(name: str, size: str) -> Path:
        point = tmp_path / name
        _mount_tmpfs(point, size)
        points.append(point)
        return point

    try:
        yield make
    finally:
        for point in reversed(points):
            _umount(point)


@pytest.fixture
def lab(tmp_path: Path, procs: ProcessGroup) -> Iterator[Lab]:
    """A lab on 127.0.0.1 (no namespaces: these cases need no link), with a
    small journal so that a meta-dir of a few MiB holds a whole set."""
    lab = Lab(tmp_path / "lab", procs, None, None, port=_free_port(), size=8 * MiB,
              options={"journal-size": "2MiB"})
    lab.write_config()
    try:
        yield lab
    finally:
        lab.stop()


def duplex(lab: Lab, node: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``duplex ARGS`` on *node*, output captured (never checked)."""
    return lab.duplex(node, *args, check=False, timeout=timeout)


def assert_user_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """*r* failed with a message (on stderr) holding every fragment, and no
    traceback anywhere. Returns the error line."""
    both = r.stdout + r.stderr
    assert "Traceback" not in both, f"a traceback reached the user:\n{both}"
    assert r.returncode != 0, f"expected a failure, got exit 0:\n{both}"
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors, f"no error line on stderr:\n{both}"
    for f in fragments:
        assert f in r.stderr, f"{f!r} is not in the message:\n{r.stderr}"
    print("user sees:", errors[-1])  # shown with -s / -rP
    return errors[-1]


def move_meta(lab: Lab, node: str, where: Path) -> Path:
    """Put *node*'s meta-dir at *where* (a tmpfs) and rewrite the config."""
    lab.meta[node] = where / "meta"
    lab.write_config()
    return lab.meta[node]


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem is full; returns it."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def meta_files(meta: Path) -> set[str]:
    return {p.name for p in meta.iterdir()} if meta.exists() else set()


# --------------------------------------------------------------------------
# Locks first (item 3)


def test_second_up_on_a_running_primary_is_refused_and_the_first_keeps_serving(lab):
    lab.create_md()
    first = lab.start_primary(history=False)
    pidfile = lab.meta["alpha"] / "nbdkit.pid"
    lab.wait(pidfile.exists, "nbdkit's pid file", proc=first)
    before = (lab.sock.stat().st_ino, pidfile.read_text())

    r = duplex(lab, "alpha", "up", RESOURCE, timeout=30)
    line = assert_user_error(r, f"resource {RESOURCE} is already up on this node (pid ")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(first.pid) in line, f"the message names another pid than {first.pid}: {line}"

    assert first.is_running()
    assert (lab.sock.stat().st_ino, pidfile.read_text()) == before
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    try:
        h.pwrite(b"\x5a" * 4096, 0)
        assert h.pread(4096, 0) == b"\x5a" * 4096
    finally:
        h.shutdown()
    assert lab.status("alpha")["running"] is True


def test_create_md_while_up_is_refused_before_touching_any_file(lab):
    lab.create_md()
    first = lab.start_secondary()
    meta = lab.meta["beta"]
    before = {p.name: p.stat().st_mtime_ns for p in meta.iterdir()}
    r = duplex(lab, "beta", "create-md", RESOURCE, "--force")
    assert_user_error(r, f"resource {RESOURCE} is already up on this node (pid {first.pid})")
    r = duplex(lab, "beta", "up", RESOURCE, timeout=30)
    assert_user_error(r, f"resource {RESOURCE} is already up on this node (pid {first.pid})")
    assert {p.name: p.stat().st_mtime_ns for p in meta.iterdir()} == before
    assert first.is_running() and lab.control("beta")["role"] == "Secondary"


# --------------------------------------------------------------------------
# create-md: all or nothing (item 6)


def test_create_md_force_replaces_the_whole_set_including_the_journal(lab):
    lab.create_md()
    paths = MetaPaths(lab.meta["beta"])
    old = load_metadata(paths.meta_dir, RESOURCE, "beta")
    old_journal = paths.journal.read_bytes()[:4096]
    r = duplex(lab, "beta", "create-md", RESOURCE, "--force")
    assert r.returncode == 0, r.stderr
    new = load_metadata(paths.meta_dir, RESOURCE, "beta")
    assert new.node_uuid != old.node_uuid
    assert paths.journal.read_bytes()[:4096] != old_journal, "the journal was not replaced"
    assert not [n for n in meta_files(paths.meta_dir) if n.startswith(".")], \
        meta_files(paths.meta_dir)
    lab.start_secondary()  # the new set belongs together: the node starts


def test_create_md_on_a_full_disk_leaves_nothing_and_a_retry_works(lab, tmpfs):
    where = tmpfs("small", "1m")  # the 2 MiB journal cannot fit
    meta = move_meta(lab, "beta", where)
    r = duplex(lab, "beta", "create-md", RESOURCE)
    assert_user_error(r, str(meta))
    assert meta_files(meta) <= {"daemon.lock"}, meta_files(meta)

    subprocess.run(["mount", "-o", "remount,size=16m", str(where)], check=True)
    r = duplex(lab, "beta", "create-md", RESOURCE)
    assert r.returncode == 0, r.stderr
    load_metadata(meta, RESOURCE, "beta")


def test_create_md_that_fails_while_writing_leaves_nothing_at_any_point(lab, tmp_path):
    """The room check passes but the filesystem runs out of inodes part way
    through the build: with 1, 2, 3, ... inodes to spare, each create-md
    fails at a later file, and each leaves nothing; the first that has
    enough succeeds."""
    point = tmp_path / "inodes"
    meta = move_meta(lab, "beta", point)
    failures = []
    try:
        for inodes in range(3, 16):
            _mount_tmpfs(point, f"16m,nr_inodes={inodes}")
            meta.mkdir(exist_ok=True)
            r = duplex(lab, "beta", "create-md", RESOURCE)
            if r.returncode == 0:
                break
            line = assert_user_error(r, str(meta))
            assert meta_files(meta) <= {"daemon.lock"}, (inodes, meta_files(meta))
            failures.append(line)
            _umount(point)
        else:
            raise AssertionError("create-md never succeeded")
        load_metadata(meta, RESOURCE, "beta")
    finally:
        _umount(point)
    building = [f for f in failures if "cannot create the metadata set" in f]
    assert len(building) >= 3, f"the build failed at too few points: {failures}"


def test_create_md_force_that_cannot_fit_keeps_the_old_set(lab, tmpfs):
    where = tmpfs("snug", "3m")  # one set (2 MiB journal) fits, two do not
    meta = move_meta(lab, "beta", where)
    assert duplex(lab, "beta", "create-md", RESOURCE).returncode == 0
    paths = MetaPaths(meta)
    before = {p: p.read_bytes() for p in (paths.metadata, paths.bitmap, paths.activity_log)}
    r = duplex(lab, "beta", "create-md", RESOURCE, "--force")
    assert_user_error(r, str(meta))
    assert {p: p.read_bytes() for p in before} == before, "the old set was changed"
    assert not [n for n in meta_files(meta) if n.startswith(".")], meta_files(meta)


def test_create_md_on_a_read_only_meta_dir_names_it(lab, tmpfs):
    where = tmpfs("ro", "16m")
    meta = move_meta(lab, "beta", where)
    meta.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    r = duplex(lab, "beta", "create-md", RESOURCE)
    assert_user_error(r, str(meta), "read-only")


def test_create_md_refuses_a_journal_path_that_is_not_a_file_before_writing(lab):
    meta = lab.meta["beta"]
    (meta / "journal").mkdir(parents=True)
    r = duplex(lab, "beta", "create-md", RESOURCE)
    assert_user_error(r, str(meta / "journal"), "not a regular file")
    assert meta_files(meta) <= {"daemon.lock", "journal"}, meta_files(meta)


def test_create_md_removes_what_an_interrupted_create_md_left(lab):
    meta = lab.meta["beta"]
    left = meta / ".create-md.crashed"
    left.mkdir(parents=True)
    (left / "journal").write_bytes(b"\0" * 4096)
    r = duplex(lab, "beta", "create-md", RESOURCE)
    assert r.returncode == 0, r.stderr
    assert not left.exists()
    load_metadata(meta, RESOURCE, "beta")


# --------------------------------------------------------------------------
# Check before ready; no tracebacks (items 9)


def test_up_on_a_full_meta_dir_names_it(lab, tmpfs):
    where = tmpfs("full-up", "16m")
    meta = move_meta(lab, "beta", where)
    lab.create_md()
    fill(where)
    r = duplex(lab, "beta", "up", RESOURCE, timeout=30)
    assert_user_error(r, str(meta))


def test_up_with_a_device_of_another_size_names_both_sizes(lab):
    lab.create_md()
    os.truncate(lab.image["alpha"], 4 * MiB)
    for role in ("primary", "secondary"):
        r = duplex(lab, "alpha", "up", RESOURCE, "--role", role, timeout=30)
        assert_user_error(r, str(lab.image["alpha"]), str(4 * MiB), str(8 * MiB))
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not lab.sock.exists()


def test_nbdkit_with_a_device_of_another_size_logs_one_line(lab, tmp_path):
    """The plugin's own startup (nbdkit run directly, as a race would leave
    it) turns the engine's error into one nbdkit error line."""
    lab.create_md()
    os.truncate(lab.image["alpha"], 4 * MiB)
    from replicator.node import PLUGIN, plugin_env
    sock = tmp_path / "direct.nbd"
    r = subprocess.run(["nbdkit", "-f", "-U", str(sock), "python", str(PLUGIN),
                        f"config={lab.config}", f"resource={RESOURCE}", "node=alpha"],
                       check=False, capture_output=True, text=True, timeout=30,
                       env=plugin_env())
    line = assert_user_error(r, str(lab.image["alpha"]))
    assert len([ln for ln in r.stderr.splitlines() if "error" in ln]) == 1, r.stderr
    assert "nbdkit" in line


def test_up_with_a_bad_secret_file_fails_before_ready(lab):
    lab.create_md()
    lab.secret.chmod(0o644)
    for node, role in (("alpha", "primary"), ("beta", "secondary")):
        r = duplex(lab, node, "up", RESOURCE, "--role", role, timeout=30)
        assert_user_error(r, str(lab.secret), "chmod 600")
        assert "ready" not in r.stderr, r.stderr
    assert not lab.sock.exists()


def test_up_with_its_port_taken_names_the_address(lab):
    lab.create_md()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", lab.port))
        s.listen(1)
        r = duplex(lab, "beta", "up", RESOURCE, timeout=30)
    assert_user_error(r, f"127.0.0.1:{lab.port}", "resource.r0.on.beta.address")


def test_promote_on_a_full_meta_dir_names_the_path(lab, tmpfs):
    where = tmpfs("full-promote", "16m")
    meta = move_meta(lab, "beta", where)
    lab.create_md()
    fill(where)
    r = duplex(lab, "beta", "promote", RESOURCE)
    assert_user_error(r, str(meta), "free space")
    assert load_metadata(meta, RESOURCE, "beta").role == "Secondary"
    (where / "filler").unlink()  # the way out the message names
    r = duplex(lab, "beta", "promote", RESOURCE)
    assert r.returncode == 0, r.stderr
    assert load_metadata(meta, RESOURCE, "beta").role == "Primary"


def test_promote_of_a_running_secondary_on_a_full_meta_dir_names_the_path(lab, tmpfs):
    where = tmpfs("full-promote-up", "16m")
    meta = move_meta(lab, "beta", where)
    lab.create_md()
    sec = lab.start_secondary()
    fill(where)
    r = duplex(lab, "beta", "promote", RESOURCE)
    line = assert_user_error(r, str(meta))
    assert "internal error" not in line
    assert sec.is_running()


def test_a_daemon_error_names_the_resource_once(lab):
    lab.create_md()
    lab.start_secondary()
    r = duplex(lab, "beta", "verify", RESOURCE)
    line = assert_user_error(r, "alpha")
    assert f"{RESOURCE}: {RESOURCE}:" not in line, line
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------
# Item 12: options anywhere, status says what JSON says


def test_global_options_are_accepted_after_the_subcommand(lab):
    lab.create_md()
    argv = [*DUPLEX, "status", RESOURCE, "--json", "--config", str(lab.config), "--node", "beta"]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30,
                       env=duplex_env())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["node"] == "beta"


def test_status_of_a_node_whose_lock_is_held_says_who_holds_it(lab):
    """Between `up` taking the lock and its control socket (or while
    create-md works) the node is not "not running"."""
    from replicator.control import NodeLock
    lab.create_md()
    with NodeLock(lab.meta["beta"], RESOURCE):
        d = lab.status("beta")
    assert d["running"] is False
    assert f"pid {os.getpid()} holds the node" in d["reason"], d["reason"]
    assert "not running" in lab.status("beta")["reason"]


def test_human_status_says_what_json_says(lab):
    lab.create_md()
    d = json.loads(duplex(lab, "beta", "status", RESOURCE, "--json").stdout)
    line = duplex(lab, "beta", "status", RESOURCE).stdout
    assert line.startswith(f"r0 role:{d['role']} disk:{d['disk']} not running"), line
    text = duplex(lab, "beta", "status", RESOURCE, "--verbose").stdout
    first = text.splitlines()[0]
    for value in (d["role"], d["connection"], d["disk"]):
        assert value in first, f"{value!r} (JSON) is not in the human status: {first!r}"


def test_offline_status_after_a_crash_does_not_show_the_reserved_seq(lab):
    lab.create_md()
    lab.start_primary(history=False)
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    for i in range(5):
        h.pwrite(b"\x01" * 4096, i * 4096)
    h.flush()
    h.shutdown()
    written = lab.control("alpha")["seq"]["written"]
    lab.kill_primary()
    d = lab.status("alpha")
    assert d["running"] is False
    assert d["seq"]["written"] in (written, None), \
        f"offline status says written {d['seq']['written']}, the node wrote {written}"
    text = duplex(lab, "alpha", "status", RESOURCE, "--verbose").stdout
    md = load_metadata(lab.meta["alpha"], RESOURCE, "alpha")
    assert md.seq_hwm == written or f"written {md.seq_hwm}" not in text, text
