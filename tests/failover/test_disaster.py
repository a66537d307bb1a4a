"""The disaster: ext4 with files and an SQLite database doing transactions
on the primary; the primary dies mid-workload and its link is cut; the
failover script promotes the secondary, moves the service address, serves,
attaches, checks and mounts. Every transaction committed through the loss
report's point A must be there, in a clean file system (DESIGN §12: a
crash image, like a reboot after a power cut)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

from pyroute2 import NetNS

from _failover_helpers import run_failover, slow_link, wait_quiet
from fixtures.blockdev import mkfs, mounted
from fixtures.duplex_lab import RESOURCE

SERVICE_ADDRESS = "10.250.0.10/24"


class Transactions:
    """A bank of accounts in SQLite (rollback journal, synchronous=EXTRA:
    COMMIT returns once the journal's deletion -- the commit point -- is
    durable too):
    each transaction inserts one row and moves money between two
    accounts, so a torn transaction breaks the books. After each COMMIT
    the primary's written seq is recorded: every write of the transaction
    has a seq at most that."""

    def __init__(self, path: Path, written_seq):
        self.path, self.written_seq = path, written_seq
        self.committed: list[tuple[int, int]] = []  # (txid, seq after commit)
        self.error: str | None = None

    def create(self) -> None:
        """The schema and 16 accounts of 1000, in one transaction."""
        con = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=DELETE")
            con.execute("PRAGMA synchronous=EXTRA")
            con.execute("BEGIN")
            con.execute("CREATE TABLE tx (id INTEGER PRIMARY KEY, payload BLOB)")
            con.execute("CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER)")
            con.executemany("INSERT INTO acct VALUES (?, 1000)", [(i,) for i in range(16)])
            con.execute("COMMIT")
        finally:
            con.close()

    def run(self, stop: threading.Event) -> None:
        try:
            con = sqlite3.connect(str(self.path), isolation_level=None)
            try:
                con.execute("PRAGMA synchronous=EXTRA")
                txid = 0
                while not stop.is_set():
                    txid += 1
                    con.execute("BEGIN")
                    con.execute("INSERT INTO tx VALUES (?, ?)",
                                (txid, hashlib.sha256(str(txid).encode()).digest() * 200))
                    con.execute("UPDATE acct SET balance = balance - 7 WHERE id = ?", (txid % 16,))
                    con.execute("UPDATE acct SET balance = balance + 7 WHERE id = ?",
                                ((txid * 5 + 1) % 16,))
                    con.execute("COMMIT")
                    self.committed.append((txid, self.written_seq()))
            finally:
                con.close()
        except Exception as e:  # the device dies under it: expected
            self.error = f"{type(e).__name__}: {e}"


class Files:
    """Files written and fsynced (file and directory), each recorded with
    the primary's written seq after its fsyncs."""

    def __init__(self, root: Path, written_seq):
        self.root, self.written_seq = root, written_seq
        self.done: list[tuple[str, str, int]] = []  # (name, sha256, seq)
        self.error: str | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            self.root.mkdir()
            dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                i = 0
                while not stop.is_set():
                    i += 1
                    data = hashlib.sha256(f"file {i}".encode()).digest() * (512 + 97 * (i % 50))
                    name = f"f{i:05d}.bin"
                    with open(self.root / name, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.fsync(dfd)
                    self.done.append((name, hashlib.sha256(data).hexdigest(), self.written_seq()))
            finally:
                os.close(dfd)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"


def _has_address(ns: str, ifname: str, cidr: str) -> bool:
    ip, plen = cidr.split("/")
    with NetNS(ns) as n:
        idx = n.link_lookup(ifname=ifname)[0]
        return any(a.get_attr("IFA_ADDRESS") == ip and a["prefixlen"] == int(plen)
                   for a in n.get_addr(index=idx))


def test_failover_after_disaster_keeps_every_transaction_committed_through_a(
        make_lab, netns_pair, nbd_block_device, tmp_path):
    lab = make_lab(size=96 << 20)
    lab.mount_point = tmp_path / "beta-mnt"  # unmounted at teardown (conftest)
    fence_env = tmp_path / "fence.env"
    lab.write_config(**{"fence-command": f"env | grep ^DUPLEX_ | sort > {fence_env}"})
    lab.set_node_keys("beta", mount_point=str(lab.mount_point),
                      service_address=SERVICE_ADDRESS, service_interface=netns_pair.ifname_b)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    dev = nbd_block_device(lab.uri)
    mkfs(dev.path, "ext4")

    def written() -> int:
        return lab.control("alpha")["seq"]["written"]

    stop = threading.Event()
    with mounted(dev.path, tmp_path / "alpha-mnt", fstype="ext4") as mnt:
        bank = Transactions(mnt / "bank.db", written)
        bank.create()
        files = Files(mnt / "files", written)
        lab.wait_drained()
        slow_link(netns_pair, lab, rate="2 mbytes/second")  # beta lags: A < the last commit
        workers = [threading.Thread(target=w.run, args=(stop,), daemon=True)
                   for w in (bank, files)]
        for w in workers:
            w.start()
        lab.wait(lambda: len(bank.committed) >= 40 and len(files.done) >= 30,
                 "transactions and files on the primary", timeout=30)
        # Disaster, mid-workload: the primary's processes die, then its
        # link goes. (Killed first, its connection closes, so beta knows
        # it is gone; the failover waits for that.)
        lab.kill_primary()
        stop.set()
        for w in workers:
            w.join(30)
        netns_pair.link_down()

    quiet = wait_quiet(lab, "beta")
    a_seen = quiet["seq"]["applied"]
    # beta's image as the promotion will find it: for the crash-image check.
    copy = tmp_path / "beta-crash.img"
    shutil.copyfile(lab.image["beta"], copy)

    r = run_failover(lab)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"failover failed:\n{out}"
    for i, step in enumerate(("fence", "promote", "address", "serve", "attach", "mount"), 1):
        assert f"[{i}/6] {step}" in r.stdout, out
    assert "e2fsck -p: clean" in r.stdout, out  # a journal replay at most
    assert fence_env.read_text() == (f"DUPLEX_NODE=beta\nDUPLEX_PEER=alpha\n"
                                     f"DUPLEX_PEER_ADDRESS={lab.addr_a}\n"
                                     f"DUPLEX_RESOURCE={RESOURCE}\n")
    assert _has_address(lab.ns_b, netns_pair.ifname_b, SERVICE_ADDRESS)
    assert os.path.ismount(lab.mount_point)
    report = json.loads((lab.meta["beta"] / "loss-report.json").read_text())
    a = report["consistent_through_seq"]
    assert a == a_seen, f"loss report A={a}, beta had applied {a_seen}"

    # The crash image itself: mounting it (journal replay, as after a power
    # cut) leaves a file system e2fsck -fn finds clean.
    with mounted(str(copy), tmp_path / "crash-mnt", fstype="ext4", options=("loop",)):
        pass
    fsck = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
    assert fsck.returncode == 0, f"e2fsck -fn on the crash image:\n{fsck.stdout}{fsck.stderr}"

    # Now beta's served device, as the failover left it: unmount, check,
    # mount read-only.
    device = json.loads((lab.meta["beta"] / "attach.json").read_text())["device"]
    subprocess.run(["umount", str(lab.mount_point)], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
    assert fsck.returncode == 0, f"e2fsck -fn {device}:\n{fsck.stdout}{fsck.stderr}"
    work = tmp_path / "db-copy"
    work.mkdir()
    with mounted(device, tmp_path / "ro-mnt", fstype="ext4", options=("ro",)) as ro:
        for p in ro.glob("bank.db*"):  # the database and a hot journal, if any
            shutil.copyfile(p, work / p.name)
        present_files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in (ro / "files").iterdir()}
    # Opening the copy is the application restarting: SQLite rolls back a
    # hot journal, as it would on the primary after a power cut.
    con = sqlite3.connect(str(work / "bank.db"))
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = {row[0] for row in con.execute("SELECT id FROM tx")}
        n_acct, total = con.execute("SELECT count(*), sum(balance) FROM acct").fetchone()
    finally:
        con.close()
    assert (n_acct, total) == (16, 16 * 1000), \
        f"the books do not balance: {n_acct} accounts, {total} in all (a torn transaction)"
    due = [txid for txid, seq in bank.committed if seq <= a]
    assert len(due) >= 5, f"only {len(due)} transactions committed through A={a}: too few to show"
    missing = [txid for txid in due if txid not in ids]
    assert not missing, f"transactions committed through A={a} are missing: {missing[:20]}"
    assert ids == set(range(1, max(ids) + 1)), "transaction ids have a hole"
    due_files = [(n, h) for n, h, seq in files.done if seq <= a]
    assert len(due_files) >= 5
    bad = [n for n, h in due_files if present_files.get(n) != h]
    assert not bad, f"files fsynced through A={a} missing or different: {bad[:20]}"
