"""Applications whose data spans two volumes of one resource (issue 12):
ext4 with its journal on the other volume, and PostgreSQL with pg_wal on
the other volume. Each runs on the primary's exports, the primary is lost
mid-workload (kill -9, then the link cut), the secondary is promoted, and
the replica pair must be what the application needs after a power cut:
e2fsck clean with its external journal, PostgreSQL starting and passing its
own recovery, and everything the application saw committed through the
loss report's point A present.

The primary's link goes through a 100 ms delay relay (tests/e2e/delay_relay.py)
so that the replica is behind when the disaster comes: A is then inside the
workload, not after it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fixtures.blockdev import mounted
from fixtures.duplex_lab import RESOURCE, VENV_BIN, Lab

MiB = 1 << 20
RELAY = Path(__file__).with_name("delay_relay.py")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _run(*argv: str, timeout: float = 120) -> str:
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
    return r.stdout


@contextmanager
def loops(*images: Path, read_only: bool = False) -> Iterator[list[str]]:
    """Loop devices for image files, detached at the end."""
    devs: list[str] = []
    try:
        for img in images:
            devs.append(_run("losetup", "--find", "--show", *(["-r"] if read_only else []),
                             str(img)).strip())
        yield devs
    finally:
        for dev in devs:
            subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


def _start_pair(lab: Lab, procs, delay_ms: int = 100) -> None:
    """create-md (the images already hold the same bytes on both nodes),
    the secondary, a delay relay, and the primary reaching the secondary
    through it (the config restored once the primary runs)."""
    lab.create_md(assume_clean=True)
    lab.start_secondary()
    relay_port = lab.port + 1
    relay = procs.start([str(VENV_BIN / "python"), str(RELAY), str(relay_port), lab.addr_b,
                         str(lab.port), str(delay_ms)], name="relay", netns=lab.ns_a)
    lab.wait(lambda: "relay listening" in relay.log_text(), "the delay relay", proc=relay)
    text = lab.config.read_text()
    direct = f'address = "{lab.addr_b}:{lab.port}"'
    lab.config.write_text(text.replace(direct, f'address = "127.0.0.1:{relay_port}"'))
    try:
        lab.start_primary(history=False)
    finally:
        lab.config.write_text(text)


def _copy_images(lab: Lab) -> None:
    """beta's images := alpha's (the pair starts identical: --assume-clean)."""
    for vol, img in lab.images["alpha"].items():
        shutil.copyfile(img, lab.images["beta"][vol])


def _disaster_and_promote(lab: Lab, netns_pair) -> dict:
    """The link goes (what the relay still holds never arrives), then the
    primary dies (kill -9); once the secondary has noticed its peer gone
    and applied what it can, it is promoted. Returns promote's JSON."""
    netns_pair.link_down()
    lab.kill_primary()
    lab.wait(lambda: lab.control("beta")["connection"] in ("Connecting", "StandAlone"),
             "the secondary to notice its primary gone", timeout=30)
    last = None
    for _ in range(60):  # until its counters stop moving
        st = lab.control("beta")
        if last is not None and st["seq"] == last["seq"]:
            break
        last = st
        time.sleep(0.5)
    r = lab.duplex("beta", "promote", RESOURCE, "--json", check=False, timeout=120)
    assert r.returncode == 0, f"promote failed:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


class Files:
    """Files written and fsynced (file, then directory) in a thread, each
    recorded with the primary's written seq after its fsyncs: every write
    of that file has a seq at most that."""

    def __init__(self, root: Path, written_seq: Callable[[], int]):
        self.root, self.written_seq = root, written_seq
        self.done: list[tuple[str, str, int]] = []  # (name, sha256, seq)
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self.root.mkdir(exist_ok=True)
            dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    data = hashlib.sha256(f"file {i}".encode()).digest() * (256 + 61 * (i % 40))
                    name = f"f{i:05d}.bin"
                    with open(self.root / name, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.fsync(dfd)
                    self.done.append((name, hashlib.sha256(data).hexdigest(),
                                      self.written_seq()))
            finally:
                os.close(dfd)
        except Exception as e:  # noqa: BLE001 - the device dies under it: expected
            self.error = f"{type(e).__name__}: {e}"


def test_ext4_with_its_journal_on_the_other_volume_survives_a_disaster(
        make_lab, netns_pair, nbd_block_device, procs, tmp_path):
    """mke2fs -O journal_dev on 'wal', mkfs.ext4 -J device= on 'data'; files
    written and fsynced through the primary's exports; the disaster; on the
    promoted replica the pair replays its journal, e2fsck -fn finds it
    clean, and every file fsynced through A is there with its bytes."""
    lab = make_lab(size=48 * MiB, volumes=["data", "wal"], volume_sizes={"wal": 8 * MiB})
    with loops(lab.images["alpha"]["wal"], lab.images["alpha"]["data"]) as (wal, data):
        _run("mke2fs", "-q", "-F", "-O", "journal_dev", "-b", "4096", wal)
        _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-J", f"device={wal}", data)
    _copy_images(lab)
    _start_pair(lab, procs)
    wal_dev = nbd_block_device(lab.volume_uri("wal")).path
    data_dev = nbd_block_device(lab.volume_uri("data")).path
    files = Files(tmp_path / "alpha-mnt" / "files", lambda: lab.control("alpha")["seq"]["written"])
    worker = threading.Thread(target=files.run, daemon=True)
    # The journal device number mkfs recorded is not this loop's: name it.
    with mounted(data_dev, tmp_path / "alpha-mnt", fstype="ext4",
                 options=(f"journal_path={wal_dev}",)):
        worker.start()
        lab.wait(lambda: len(files.done) >= 60 or files.error, "files on the primary",
                 timeout=30)
        assert files.error is None, files.error
        doc = _disaster_and_promote(lab, netns_pair)
        files.stop.set()
        worker.join(30)
    a = doc["consistent_through_seq"]
    lost = doc["loss_report"]["lost"]
    assert any(f[2] > a for f in files.done) or lost, \
        f"the replica was not behind (A={a}): the test shows nothing"
    # The replica pair as the application finds it after a power cut:
    # copies, so checking cannot touch the promoted node's images.
    copies = {v: tmp_path / f"replica-{v}.img" for v in ("data", "wal")}
    for v, p in copies.items():
        shutil.copyfile(lab.images["beta"][v], p)
    with loops(copies["wal"], copies["data"]) as (wal, data):
        with mounted(data, tmp_path / "replica-mnt", fstype="ext4",
                     options=(f"journal_path={wal}",)) as mnt:  # the journal replay
            present = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in (mnt / "files").iterdir()}
        fsck = subprocess.run(["e2fsck", "-fn", "-j", wal, data], check=False,
                              capture_output=True, text=True)
    assert fsck.returncode == 0, f"e2fsck -fn on the replica pair:\n{fsck.stdout}{fsck.stderr}"
    committed = [(n, d) for n, d, seq in files.done if seq <= a]
    print(f"\next4: A={a}, {len(files.done)} files fsynced on the primary, {len(committed)} "
          f"through A, {len(present)} on the replica")
    assert len(committed) >= 10, f"only {len(committed)} files fsynced through A={a}"
    missing = [n for n, d in committed if present.get(n) != d]
    assert not missing, (f"{len(missing)} of {len(committed)} files fsynced through A={a} "
                         f"are missing or differ on the replica: {missing[:5]}")


# -- PostgreSQL ---------------------------------------------------------------

def _children(pid: int) -> list[int]:
    """The pids whose parent is *pid*."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Postgres:
    """A PostgreSQL server run by the test as user postgres: its data
    directory on one file system, pg_wal on another, a socket directory
    of its own, no TCP."""

    def __init__(self, pgdata: Path, sockdir: Path, log: Path):
        self.pgdata, self.sockdir, self.log = pgdata, sockdir, log

    def _as_postgres(self, *argv: str, timeout: float = 120) -> str:
        return _run("runuser", "-u", "postgres", "--", *argv, timeout=timeout)

    def initdb(self, waldir: Path) -> None:
        for d in (self.pgdata.parent, waldir.parent):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "postgres", "postgres")
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.pgdata), "--waldir",
                          str(waldir), "-A", "trust", "-U", "postgres", "--wal-segsize=1")

    def start(self) -> None:
        for d in (self.sockdir, self.log.parent):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "postgres", "postgres")
        r = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.pgdata),
             "-l", str(self.log), "-w", "-t", "60", "-o",
             (f"-k {self.sockdir} -c listen_addresses='' -c fsync=on -c synchronous_commit=on "
              "-c full_page_writes=on -c max_wal_size=16MB -c min_wal_size=4MB "
              "-c shared_buffers=16MB"), "start"],
            check=False, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise AssertionError(f"PostgreSQL on {self.pgdata} did not start:\n{r.stdout}"
                                 f"{r.stderr}\n{log[-4000:]}")

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D",
                        str(self.pgdata), "-m", mode, "-w", "-t", "30", "stop"],
                       check=False, capture_output=True, text=True, timeout=60)

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a power cut for it)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        for child in _children(pid):
            _kill(child)
        _kill(pid)

    def psql(self, sql: str) -> str:
        return self._as_postgres("psql", "-h", str(self.sockdir), "-U", "postgres", "-AtX",
                                 "-v", "ON_ERROR_STOP=1", "-c", sql)

    def client(self) -> subprocess.Popen:
        """One psql session reading statements from stdin."""
        return subprocess.Popen(["runuser", "-u", "postgres", "--", "psql", "-h",
                                 str(self.sockdir), "-U", "postgres", "-AtX", "-q",
                                 "-v", "ON_ERROR_STOP=1"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)


class Commits:
    """Transactions through one psql session: each inserts row i and moves
    money between two accounts; after psql answered COMMIT the primary's
    written seq is recorded: every WAL and data write the commit needed has
    a seq at most that."""

    def __init__(self, pg: Postgres, written_seq: Callable[[], int]):
        self.pg, self.written_seq = pg, written_seq
        self.committed: list[tuple[int, int]] = []  # (row id, seq after COMMIT)
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        p = self.pg.client()
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                p.stdin.write(f"BEGIN; INSERT INTO rows VALUES ({i}, repeat('r', 500)); "
                              f"UPDATE acct SET bal = bal - 3 WHERE id = {i % 8}; "
                              f"UPDATE acct SET bal = bal + 3 WHERE id = {(i * 3 + 1) % 8}; "
                              f"COMMIT; \\echo committed {i}\n")
                p.stdin.flush()
                line = p.stdout.readline().strip()
                if line != f"committed {i}":
                    self.error = f"psql said {line!r} for transaction {i}"
                    return
                self.committed.append((i, self.written_seq()))
        except Exception as e:  # noqa: BLE001 - the device or the primary dies under it
            self.error = f"{type(e).__name__}: {e}"
        finally:
            # End of input ends psql (its server may be gone); then make sure.
            try:
                p.stdin.close()
                p.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait(10)


def test_postgresql_with_pg_wal_on_the_other_volume_fails_over(
        make_lab, netns_pair, nbd_block_device, procs, tmp_path, shm_dir):
    """PostgreSQL's data directory on volume 'data' and pg_wal on volume
    'wal' (each its own ext4), transactions through psql and pgbench at
    once; the disaster; on the promoted replica PostgreSQL starts, passes
    its own crash recovery, and every transaction psql saw committed
    through A is there, the accounts balanced."""
    lab = make_lab(size=128 * MiB, volumes=["data", "wal"], volume_sizes={"wal": 48 * MiB})
    with loops(lab.images["alpha"]["data"], lab.images["alpha"]["wal"]) as devs:
        for dev in devs:
            _run("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
    _copy_images(lab)
    _start_pair(lab, procs)
    data_dev = nbd_block_device(lab.volume_uri("data")).path
    wal_dev = nbd_block_device(lab.volume_uri("wal")).path
    written = lambda: lab.control("alpha")["seq"]["written"]
    # User postgres must reach its directories: not under tmp_path (0700).
    shm_dir.chmod(0o755)
    sock, logs = shm_dir / "sock", shm_dir / "pglog"
    pgbench = None
    with ExitStack() as stack:
        mdata = stack.enter_context(mounted(data_dev, shm_dir / "alpha-data", fstype="ext4"))
        mwal = stack.enter_context(mounted(wal_dev, shm_dir / "alpha-wal", fstype="ext4"))
        logs.mkdir()
        pg = Postgres(mdata / "pg", sock, logs / "alpha.log")
        pg.initdb(mwal / "pg_wal")
        pg.start()
        stack.callback(pg.kill)
        pg.psql("CREATE TABLE rows (id int PRIMARY KEY, pad text); "
                "CREATE TABLE acct (id int PRIMARY KEY, bal int); "
                "INSERT INTO acct SELECT g, 1000 FROM generate_series(0, 7) g;")
        _run("runuser", "-u", "postgres", "--", str(PG_BIN / "pgbench"), "-i", "-q", "-s", "1",
             "-h", str(sock), "-U", "postgres", "postgres")
        pgbench = subprocess.Popen(["runuser", "-u", "postgres", "--", str(PG_BIN / "pgbench"),
                                    "-n", "-c", "2", "-T", "60", "-h", str(sock), "-U",
                                    "postgres", "postgres"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(pgbench.kill)
        commits = Commits(pg, written)
        worker = threading.Thread(target=commits.run, daemon=True)
        worker.start()
        lab.wait(lambda: len(commits.committed) >= 150 or commits.error,
                 "transactions on the primary", timeout=40)
        assert commits.error is None, commits.error
        doc = _disaster_and_promote(lab, netns_pair)
        pg.kill()  # the application dies with its host
        commits.stop.set()
        worker.join(30)
    a = doc["consistent_through_seq"]
    through_a = [i for i, seq in commits.committed if seq <= a]
    assert len(through_a) >= 20, f"only {len(through_a)} transactions committed through A={a}"
    assert any(seq > a for _, seq in commits.committed), \
        f"the replica was not behind (A={a}): the test shows nothing"
    # The replica pair, copied, mounted (ext4 journal replay), and
    # PostgreSQL started on it: its own WAL recovery.
    copies = {v: tmp_path / f"replica-{v}.img" for v in ("data", "wal")}
    for v, p in copies.items():
        shutil.copyfile(lab.images["beta"][v], p)
    with ExitStack() as stack:
        data, wal = stack.enter_context(loops(copies["data"], copies["wal"]))
        rdata = stack.enter_context(mounted(data, shm_dir / "replica-data", fstype="ext4"))
        rwal = stack.enter_context(mounted(wal, shm_dir / "replica-wal", fstype="ext4"))
        link = rdata / "pg" / "pg_wal"
        # initdb made pg_wal a symlink to the wal mount on the primary: point
        # it at the replica's wal mount, as a failover script would mount it
        # at the same place.
        link.unlink()
        link.symlink_to(rwal / "pg_wal")
        # The dead primary's pid file names a process of another host.
        (rdata / "pg" / "postmaster.pid").unlink(missing_ok=True)
        rpg = Postgres(rdata / "pg", shm_dir / "rsock", logs / "replica.log")
        rpg.start()
        stack.callback(rpg.stop)
        ids = {int(x) for x in rpg.psql("SELECT id FROM rows").split()}
        total = int(rpg.psql("SELECT sum(bal) FROM acct"))
        log = (logs / "replica.log").read_text()
    assert "database system is ready to accept connections" in log, log[-3000:]
    missing = [i for i in through_a if i not in ids]
    print(f"\npostgresql: A={a}, {len(commits.committed)} transactions committed on the "
          f"primary, {len(through_a)} through A, {len(ids)} rows on the replica")
    assert not missing, (f"{len(missing)} of {len(through_a)} transactions committed through "
                         f"A={a} are missing on the replica: {missing[:10]}")
    assert total == 8000, f"the accounts hold {total}, not 8000: a torn transaction"
    # Rows are a prefix of what was sent: nothing after a gap.
    assert ids == set(range(1, len(ids) + 1)), "rows on the replica are not a prefix"
    if pgbench is not None:
        pgbench.wait(10)
