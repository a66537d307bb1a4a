"""systemd/duplex@.service under a real systemd: two containers booted by
``systemd-nspawn`` (one per network namespace of ``netns_pair``) from trees
made of this machine's own files (its /usr bound read-only, a copy of its
/etc), Duplex installed in each by ``scripts/install`` from a checkout under
/root, ``duplex@r0`` enabled on both, a write replicated, the primary
stopped, ``duplex promote r0`` on the secondary, and the unit starting
again by itself as Primary, serving the replicated bytes. The journal has
the lines with DUPLEX_RESOURCE and DUPLEX_NODE fields.

If this machine cannot boot a systemd in a container at all (tried first,
with a bare tree and nothing of Duplex in it), the test is skipped with
nspawn's own output as the reason; a missing systemd-nspawn is a failure
(scripts/setup installs systemd-container).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from fixtures.netns import NetnsPair

REPO = Path(__file__).resolve().parents[2]
#: Where the containers see this checkout: under /root, which the unit's
#: ProtectHome=yes hides from the service. The install must not leave the
#: service depending on it.
CHECKOUT_IN_CONTAINER = "/root/duplex"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SIZE = 64 << 20
PORT = 7789
BOOT_TIMEOUT = 120.0


def _wait(pred, what: str, timeout: float = 60.0, interval: float = 0.2):
    """Poll *pred* until it returns a true value; fail naming *what*."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def make_tree(root: Path, hostname: str) -> None:
    """A root directory for a container of this machine's own OS: /usr is
    bound read-only at boot; /etc is a copy (systemd writes machine-id);
    /var empty but for the dpkg database bound at boot (scripts/install
    checks packages with dpkg-query)."""
    for d in ("usr", "proc", "sys", "dev", "run", "tmp", "var/lib/dpkg", "root", "home",
              "usr-local/lib/duplex"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            (root / link).symlink_to(os.readlink(f"/{link}"))
    subprocess.run(["cp", "-a", "/etc", str(root / "etc")], check=True)
    etc = root / "etc"
    # nspawn checks for os-release before /usr is mounted: a real file.
    (etc / "os-release").unlink(missing_ok=True)
    shutil.copy("/usr/lib/os-release", etc / "os-release")
    (etc / "machine-id").write_text("")  # systemd makes one at boot
    (etc / "hostname").write_text(hostname + "\n")
    # Only what the test needs starts at boot: not this machine's services
    # (a database, timers, gettys) from the copied /etc.
    for wants in ("multi-user.target.wants", "timers.target.wants", "getty.target.wants"):
        shutil.rmtree(etc / "systemd" / "system" / wants, ignore_errors=True)
    shutil.rmtree(etc / "duplex", ignore_errors=True)
    (etc / "fstab").write_text("")


@dataclass
class Container:
    """One booted container: systemd as its PID 1, in network namespace *ns*."""

    name: str  # the host name, also the Duplex node name
    root: Path
    ns: str | None
    log_path: Path
    extra_binds: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    leader: int | None = None

    def boot(self) -> None:
        """Start systemd-nspawn --boot; returns once PID 1 runs systemd."""
        argv = ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
                # The machine name is unique per run (nspawn keeps a
                # directory per name); the host name is the node's.
                f"--machine=dpx{os.getpid()}-{self.name}", f"--hostname={self.name}",
                f"--directory={self.root}",
                "--bind-ro=/usr", "--bind-ro=/var/lib/dpkg", *self.extra_binds]
        if self.ns:
            argv.append(f"--network-namespace-path=/run/netns/{self.ns}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)

        def leader() -> int | None:
            if self.proc.poll() is not None:
                raise BootFailed(f"systemd-nspawn exited with status {self.proc.returncode}: "
                                 f"{self.log_path.read_text(errors='replace').strip()}")
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            except OSError:
                return None
            for pid in map(int, kids.split()):
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return pid
                except OSError:
                    pass
            return None

        self.leader = _wait(leader, f"container {self.name}'s PID 1 (systemd)", timeout=60)

    def argv(self, *cmd: str, net: bool = True) -> list[str]:
        """*cmd* inside the container (its mounts, pids, host name and, if
        *net*, its network), with a clean environment; without *net* (the
        install's pip reaching the package index) this machine's proxy and
        pip settings go along."""
        ns = ["-m", "-u", "-i", "-p", *(["-n"] if net else [])]
        passed = [] if net else [f"{k}={v}" for k, v in sorted(os.environ.items())
                                 if k.startswith("PIP_") or k.lower().endswith("_proxy")]
        return ["nsenter", "-t", str(self.leader), *ns, "--", "/usr/bin/env", "-i",
                f"PATH={CONTAINER_PATH}", "HOME=/root", "LANG=C.UTF-8", *passed, *cmd]

    def run(self, *cmd: str, check: bool = True, net: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Run *cmd* inside the container; with *check*, fail showing its output."""
        r = subprocess.run(self.argv(*cmd, net=net), capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"{self.name}: `{' '.join(cmd)}` failed ({r.returncode}):\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r

    def wait_booted(self) -> str:
        """systemd's state once start-up is over: running, or degraded (a
        unit of the copied /etc that cannot start in a container)."""
        # systemctl needs systemd's private socket, made early in its boot.
        sock = Path(f"/proc/{self.leader}/root/run/systemd/private")
        try:
            _wait(sock.exists, f"{sock} (systemd's control socket)", timeout=BOOT_TIMEOUT)
        except AssertionError as e:
            raise BootFailed(f"systemd in container {self.name} made no control socket: {e}; "
                             f"nspawn log: {self.log_path.read_text(errors='replace')[-2000:]}")
        r = self.run("systemctl", "is-system-running", "--wait", check=False,
                     timeout=BOOT_TIMEOUT)
        state = r.stdout.strip()
        if state not in ("running", "degraded"):
            raise BootFailed(f"systemd in container {self.name} did not finish booting: "
                             f"is-system-running says {state!r} ({r.stderr.strip()}); "
                             f"nspawn log: {self.log_path.read_text(errors='replace')[-2000:]}")
        return state

    def unit(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show UNIT -p ...`` as a dict."""
        r = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def shutdown(self) -> None:
        """Power the container off (SIGTERM to nspawn asks systemd to halt);
        SIGKILL to the whole session when it does not stop."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            if self.leader:
                try:
                    os.kill(self.leader, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=30)
        # nspawn leaves an empty directory per machine for its mount propagation.
        shutil.rmtree(f"/run/systemd/nspawn/propagate/dpx{os.getpid()}-{self.name}",
                      ignore_errors=True)


class BootFailed(Exception):
    """This machine could not boot a systemd in a container."""


_probe_result: list[str | None] = []


def _probe_boot(tmp: Path) -> str | None:
    """Boot a bare container once per session: None if systemd came up,
    else why not (nspawn's and systemd's own words)."""
    if _probe_result:
        return _probe_result[0]
    root = tmp / "probe-root"
    make_tree(root, "dpxprobe")
    c = Container("dpxprobe", root, None, tmp / "probe-nspawn.log")
    why = None
    try:
        c.boot()
        c.wait_booted()
    except BootFailed as e:
        why = str(e)
    finally:
        c.shutdown()
    _probe_result.append(why)
    return why


def _config(addr_a: str, addr_b: str) -> str:
    lines = ["[resource.r0]", 'secret-file = "/etc/duplex/r0.secret"', 'track-size = "64KiB"',
             'ring-size = "16MiB"', 'journal-size = "64MiB"', 'al-extent-size = "1MiB"',
             "al-extents = 64"]
    for name, addr in (("alpha", addr_a), ("beta", addr_b)):
        lines += ["", f"[resource.r0.on.{name}]", f'address = "{addr}:{PORT}"',
                  'device = "/var/lib/duplex/r0.img"', 'meta-dir = "/var/lib/duplex/r0"',
                  'export = "unix:/run/duplex/r0.nbd"']
    return "\n".join(lines) + "\n"


@pytest.fixture
def hosts(netns_pair: NetnsPair, tmp_path: Path) -> Iterator[dict[str, Container]]:
    """Two booted containers, alpha in ns_a and beta in ns_b, each with
    /etc/duplex (config, secret) and an image; Duplex not yet installed.
    Both powered off at teardown, before the namespaces go."""
    if shutil.which("systemd-nspawn") is None:
        pytest.fail("systemd-nspawn is not installed (apt-get install systemd-container; "
                    "scripts/setup installs it)", pytrace=False)
    why = _probe_boot(tmp_path)
    if why is not None:
        pytest.skip(f"this machine cannot boot systemd in a container: {why}")
    venv = tmp_path / "venv"  # one install, the same path in both: /usr/local/lib/duplex
    venv.mkdir()
    secret = "nspawn-secret-" + os.urandom(8).hex() + "\n"
    config = _config(netns_pair.addr_a, netns_pair.addr_b)
    out: dict[str, Container] = {}
    try:
        for name, ns in (("alpha", netns_pair.ns_a), ("beta", netns_pair.ns_b)):
            root = tmp_path / f"{name}-root"
            make_tree(root, name)
            (root / "etc/duplex").mkdir(mode=0o755)
            (root / "etc/duplex/duplex.toml").write_text(config)
            (root / "etc/duplex/r0.secret").write_text(secret)
            (root / "etc/duplex/r0.secret").chmod(0o600)
            (root / "var/lib/duplex").mkdir(mode=0o700, parents=True)
            with open(root / "var/lib/duplex/r0.img", "wb") as f:
                f.truncate(SIZE)
            c = Container(name, root, ns, tmp_path / f"{name}-nspawn.log", extra_binds=[
                f"--bind-ro={REPO}:{CHECKOUT_IN_CONTAINER}",
                f"--bind={root / 'usr-local'}:/usr/local",
                f"--bind={venv}:/usr/local/lib/duplex",
                # attach: nbdfuse and losetup (the kernel here may have no nbd)
                *(f"--bind={d}" for d in _attach_devices())])
            out[name] = c
            c.boot()
        for c in out.values():
            c.wait_booted()
        yield out
    finally:
        for c in out.values():
            c.shutdown()  # systemd stops the units: unmount, detach, the server
            _release_loop(c.root)


def _attach_devices() -> list[str]:
    """The device nodes `duplex attach` needs inside a container (its /dev
    is a tmpfs without udev): FUSE, loop-control and the loop devices."""
    return ["/dev/fuse", "/dev/loop-control",
            *sorted(str(p) for p in Path("/dev").glob("loop[0-9]*"))]


def _release_loop(root: Path) -> None:
    """A loop device the attach of a failed run left (its backing file was
    in the container's /run, gone with it): detached here."""
    record = root / "var/lib/duplex/r0/attach.json"
    try:
        device = json.loads(record.read_text()).get("device", "")
    except (OSError, ValueError):
        return
    if device.startswith("/dev/loop"):
        r = subprocess.run(["losetup", "--noheadings", "-O", "BACK-FILE", device],
                           capture_output=True, text=True)
        if "/run/duplex/" in r.stdout:
            subprocess.run(["losetup", "-d", device], capture_output=True)


def _status(c: Container) -> dict:
    return json.loads(c.run("duplex", "status", "r0", "--json").stdout)


def _journal(c: Container, *match: str) -> list[dict]:
    r = c.run("journalctl", "--no-pager", "-o", "json", *match)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


@pytest.mark.timeout(900)
def test_unit_replicates_and_restarts_as_primary_after_promote_under_real_systemd(hosts):
    alpha, beta = hosts["alpha"], hosts["beta"]
    # The install: from the checkout under /root, with this machine's network
    # (pip) but the container's files; the second finds the shared venv done.
    for c in (alpha, beta):
        r = c.run(f"{CHECKOUT_IN_CONTAINER}/scripts/install", net=False, timeout=600)
        assert "install: done" in r.stdout, r.stdout + r.stderr
        if c is beta:  # the same sources: no second build
            assert "/usr/local/lib/duplex/venv is up to date" in r.stdout, r.stdout
        target = c.run("readlink", "-f", "/usr/local/bin/duplex").stdout.strip()
        assert target == "/usr/local/lib/duplex/venv/bin/duplex", target
        assert not target.startswith(CHECKOUT_IN_CONTAINER)
        c.run("duplex", "create-md", "r0", "--assume-clean")

    # beta: the unit as shipped, fresh metadata: a Secondary.
    beta.run("systemctl", "enable", "--now", "duplex@r0")
    # alpha: the pair's first Primary, recorded by one `up --role primary`
    # (a transient unit, ready by sd_notify, stopped cleanly); then the
    # shipped unit starts it from its metadata.
    alpha.run("systemd-run", "--unit=duplex-first-r0", "--service-type=notify",
              "--setenv=DUPLEX_CONFIG=/etc/duplex/duplex.toml", "/usr/local/bin/duplex", "up",
              "r0", "--role", "primary")
    alpha.run("systemctl", "stop", "duplex-first-r0")
    alpha.run("systemctl", "enable", "--now", "duplex@r0")
    for c, role in ((alpha, "Primary"), (beta, "Secondary")):
        u = c.unit("duplex@r0.service", "ActiveState", "SubState", "Type")
        assert (u["ActiveState"], u["Type"]) == ("active", "notify"), (c.name, u)
        assert _status(c)["role"] == role

    # A write through alpha's export, replicated to beta.
    data = os.urandom(1 << 20)
    (alpha.root / "var/lib/duplex/payload.bin").write_bytes(data)
    alpha.run("nbdsh", "-u", "nbd+unix:///?socket=/run/duplex/r0.nbd", "-c",
              "h.pwrite(open('/var/lib/duplex/payload.bin', 'rb').read(), 4 << 20); h.flush()")
    written = _wait(lambda: _status(alpha)["seq"]["written"], "alpha's write")
    _wait(lambda: _status(beta)["seq"]["applied"] >= written, f"beta applying seq {written}")
    with open(beta.root / "var/lib/duplex/r0.img", "rb") as f:
        f.seek(4 << 20)
        assert f.read(len(data)) == data, "beta's image does not hold the replicated write"

    # The primary goes (a clean stop); the secondary is promoted while its
    # unit runs: it exits 75 and systemd starts it again, as Primary.
    alpha.run("systemctl", "stop", "duplex@r0")
    # The attach unit, enabled on the Secondary: skipped there (no export).
    beta.run("systemctl", "enable", "--now", "duplex-attach@r0", check=False)
    u = beta.unit("duplex-attach@r0.service", "ActiveState", "Result")
    assert (u["ActiveState"], u["Result"]) == ("inactive", "exec-condition"), u
    before = int(beta.unit("duplex@r0.service", "NRestarts")["NRestarts"])
    _wait(lambda: _status(beta)["connection"] != "Connected", "beta seeing alpha gone")
    r = beta.run("duplex", "promote", "r0", "--wait", "30")
    assert "next: nothing: duplex@r0.service restarts by itself as Primary" in r.stdout, r.stdout
    assert "systemctl start" not in r.stdout, r.stdout

    def restarted_primary():
        u = beta.unit("duplex@r0.service", "ActiveState", "NRestarts", "ExecMainStatus")
        if u["ActiveState"] != "active" or int(u["NRestarts"]) <= before:
            return None
        st = _status(beta)
        return st if st["role"] == "Primary" and st.get("nbd_uri") else None

    st = _wait(restarted_primary, "beta's unit restarted as Primary", timeout=120)
    assert st["role"] == "Primary"
    out = beta.run("nbdsh", "-u", "nbd+unix:///?socket=/run/duplex/r0.nbd", "-c",
                   f"import sys; sys.stdout.buffer.write(h.pread({len(data)}, 4 << 20).hex().encode())")
    assert bytes.fromhex(out.stdout) == data, "the promoted export does not serve the write"

    # The restart pulled in the attach unit (WantedBy=duplex@%i): the
    # Primary's export is a block device now.
    _wait(lambda: beta.unit("duplex-attach@r0.service", "ActiveState")["ActiveState"]
          == "active", "duplex-attach@r0 active after the restart as Primary")
    device = json.loads((beta.root / "var/lib/duplex/r0/attach.json").read_text())["device"]
    # A file system on it, mounted by a unit ordered after the attach, as
    # the attach unit's header shows; then stopping the server stops the
    # mount first, then the attach, then the server.
    beta.run("mkfs.ext4", "-q", device)
    (beta.root / "etc/systemd/system/mnt-dpx.mount").write_text(
        "[Unit]\nRequires=duplex-attach@r0.service\nAfter=duplex-attach@r0.service\n"
        f"[Mount]\nWhat={device}\nWhere=/mnt/dpx\nType=ext4\n")
    beta.run("systemctl", "daemon-reload")
    beta.run("systemctl", "start", "mnt-dpx.mount", timeout=60)
    beta.run("sh", "-c", "echo on-the-replica > /mnt/dpx/f && sync")
    cursor = beta.run("journalctl", "--show-cursor", "-n", "0", "--quiet").stdout
    cursor = cursor.strip().rpartition("cursor: ")[2]
    beta.run("systemctl", "stop", "duplex@r0", timeout=180)
    for unit in ("mnt-dpx.mount", "duplex-attach@r0.service", "duplex@r0.service"):
        assert beta.unit(unit, "ActiveState")["ActiveState"] == "inactive", unit
    stops = [(rec.get("UNIT"), rec.get("MESSAGE", ""))
             for rec in _journal(beta, f"--after-cursor={cursor}", "_PID=1")
             if rec.get("UNIT") and rec.get("MESSAGE", "").startswith(("Stopped", "Unmounted"))]
    order = [u for u, _ in stops]
    assert order.index("mnt-dpx.mount") < order.index("duplex-attach@r0.service") \
        < order.index("duplex@r0.service"), stops
    waited = [rec.get("MESSAGE", "") for rec in _journal(beta, f"--after-cursor={cursor}",
                                                          "DUPLEX_RESOURCE=r0")
              if "/mnt/dpx" in rec.get("MESSAGE", "")]
    assert not waited, f"the server waited for the mounted device: {waited}"

    # The journal: the node's lines carry the resource and node as fields,
    # from `duplex up` (both roles) and from the plugin inside nbdkit.
    recs = _journal(beta, "DUPLEX_RESOURCE=r0", "DUPLEX_NODE=beta")
    texts = [rec.get("MESSAGE", "") for rec in recs]
    assert any("promoted to Primary" in t and "duplex@r0.service restarts it as Primary" in t
               for t in texts), texts[-30:]
    assert {rec.get("_COMM") for rec in recs} >= {"nbdkit"}, {rec.get("_COMM") for rec in recs}
    assert all(rec.get("SYSLOG_IDENTIFIER") == "duplex" for rec in recs)
    assert _journal(alpha, "DUPLEX_RESOURCE=r0", "DUPLEX_NODE=alpha"), \
        "alpha's journal has no record with DUPLEX_RESOURCE=r0 DUPLEX_NODE=alpha"
