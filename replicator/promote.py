"""Failover: ``duplex promote`` and ``duplex demote`` (DESIGN §7).

Theory of operation
-------------------
Promotion turns a secondary into the primary of a new history:

1. **Refuse** what would be unsafe, unless ``--force``: a secondary whose
   primary is still connected (two primaries: split brain), and one whose
   image is not a valid copy (Inconsistent: initial sync unfinished;
   Outdated: demoted and never resynced).
2. **Stop receiving**: close the links, accept no new ones. From here on
   nothing enters the pending queue.
3. **Apply every in-order run** of journaled records, and a committed
   catch-up increment (the image becomes the primary's exact state after
   write A), make it durable, checkpoint the journal. (An image promoted
   by force although invalid gets nothing more applied: that would not
   make it valid.)
4. **Loss report** (DESIGN §7): consistent through A with its
   timestamp, every write known lost after A, and that nothing after the
   last token is known. One report for the whole resource: with several
   volumes (DESIGN §8) each lost write names its volume. Written atomically as JSON to
   ``meta-dir/loss-report.json``; the CLI also prints it.
5. **New generation**: the old one is pushed onto ``history``,
   ``bitmap_uuid`` names it (the OOS bitmap, cleared now, records this
   node's changes relative to it, for the old primary's later resync), the
   seq high-water mark moves past every seq this node has heard of, role
   Primary, disk UpToDate. Saving the metadata is the commit point: a crash
   before it leaves a Secondary that can be promoted again, with the same
   report.

A running secondary is promoted in place through its control socket
(:func:`promote_running`, registered by ``replicator.node``), after which
the daemon exits (``node.EXIT_PROMOTED``) so that ``duplex up`` -- or
systemd -- starts the node again, now as primary. A stopped one is
promoted offline (:func:`promote_offline`): its journal is replayed and
applied here. :func:`promote` picks the right one.

Demotion (:func:`demote`) is the reverse on a stopped Primary: role
Secondary, disk **Outdated** -- the flag that says "resync from the peer
before this image counts" (the catch-up engine clears it). The generation,
history and OOS bitmap stay as they are: they are what the generation
handshake needs to find this node's writes the peer never got. The journal
is started over, since anything still in it belongs to a history this node
left when it became primary.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from replicator.config import DEFAULT_VOLUME, Config, Group, Node, Resource, local_node_name
from replicator.native.bitmap import Bitmap
from replicator.native.core import CoreError
from replicator.errors import DuplexError
from replicator.fileio import atomic_write
from replicator.secondary.lossreport import LossReport, build_loss_report
from replicator.metadata import (DISK_CONSISTENT, DISK_INCONSISTENT, DISK_OUTDATED, DISK_UPTODATE, ROLE_PRIMARY,
                                 ROLE_SECONDARY, Metadata, MetaPaths, load_metadata, new_uuid)
from replicator.secondary.pending import LossView

if TYPE_CHECKING:  # secondary.py is only needed to promote
    from replicator.secondary.daemon import Secondary

log = logging.getLogger("duplex.promote")

#: How long applying the journal may take before promote gives up
#: (``promote --timeout``): failover must never hang on a failing disk.
DEFAULT_TIMEOUT = 60.0
#: A failed apply (offline promote) is retried after this, doubling to the max.
_RETRY = (0.5, 5.0)
#: Older generations kept in the metadata (DRBD keeps two; more costs nothing).
HISTORY_MAX = 16

# One promotion at a time in a daemon: a second request waits for nothing,
# it is refused.
_promoting = threading.Lock()


class PromoteError(DuplexError):
    """Promotion or demotion was refused, or failed; the message says why."""


@dataclass
class Promotion:
    """The outcome of a promotion, as the control socket and --json carry it."""

    resource: str
    node: str
    generation: str
    previous_generation: str
    report: LossReport
    report_path: str
    forced: list[str] = field(default_factory=list)  # what --force overrode
    # The systemd unit that starts the promoted node again by itself (the
    # running secondary exits 75 under RestartForceExitStatus), or None:
    # a promotion offline or of a `duplex up` not run by systemd.
    restarted_by: str | None = None

    def to_dict(self) -> dict:
        """Plain data: the loss report under ``loss_report``."""
        return {
            "resource": self.resource,
            "node": self.node,
            "role": ROLE_PRIMARY,
            "generation": self.generation,
            "previous_generation": self.previous_generation,
            "consistent_through_seq": self.report.consistent_through_seq,
            "loss_report_path": self.report_path,
            "forced": list(self.forced),
            "restarted_by": self.restarted_by,
            "loss_report": self.report.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Promotion:
        """Read back :meth:`to_dict` (the CLI's side of the control socket)."""
        try:
            report = LossReport.from_json(json.dumps(d["loss_report"]))
            return cls(d["resource"], d["node"], d["generation"], d["previous_generation"],
                       report, d["loss_report_path"], list(d.get("forced", [])),
                       d.get("restarted_by"))
        except (KeyError, TypeError, ValueError) as e:
            raise PromoteError(f"the promote reply is malformed: {e}") from None

    def to_text(self) -> str:
        """The report for people, then what happened and what comes next."""
        lines = [self.report.to_text().rstrip("\n"), ""]
        lines.append(f"{self.resource}: node {self.node} is now Primary "
                     f"(generation {self.generation}, previous {self.previous_generation}).")
        for what in self.forced:
            lines.append(f"  forced: {what}")
        lines.append(f"  loss report: {self.report_path}")
        if self.restarted_by:
            lines.append(f"  next: nothing: {self.restarted_by} restarts by itself as Primary "
                         f"and serves the image (systemctl status {self.restarted_by})")
        else:
            lines.append(f"  next: `duplex up {self.resource}` serves the image "
                         f"(under systemd: systemctl start duplex@{self.resource})")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# checks


def _inconsistency(md: Metadata) -> str | None:
    """Why this node's image is no valid copy, or None when it is one."""
    if md.invalidated:
        return ("its data was invalidated by the admin (`duplex invalidate`) and the full "
                "sync from its peer has not completed")
    if md.needs_initial_sync:
        return ("its initial sync never finished (it was created without --assume-clean "
                "and has not been fully synced since), so its image is not the primary's "
                "data at any point in time")
    if md.disk == DISK_INCONSISTENT:
        return "its disk is Inconsistent: a resync was interrupted"
    if md.disk == DISK_OUTDATED:
        return ("its disk is Outdated: it was demoted and has not resynced from its peer "
                "since, so the peer holds newer data")
    if md.outdated:
        return ("its data was marked Outdated by the admin (`duplex outdate`) and it has not "
                "caught up with its primary since, so the peer may hold newer data")
    return None


def _state_word(md: Metadata) -> str:
    return DISK_OUTDATED if ((md.disk == DISK_OUTDATED or md.outdated)
                             and not md.needs_initial_sync and not md.invalidated) \
        else DISK_INCONSISTENT


def check_promotable(md: Metadata, resource: Resource, node: Node, *, connected: bool,
                     force: bool, heard_ago: float | None = None) -> list[str]:
    """Refuse an unsafe promotion unless *force*; returns, in words, what
    *force* overrode (empty when nothing was unsafe)."""
    name = f"{resource.name}: cannot promote node {node.name}"
    if md.role == ROLE_PRIMARY:
        raise PromoteError(f"{resource.name}: node {node.name} is already Primary "
                           f"(generation {md.generation}); nothing to promote")
    forced = []
    why = _inconsistency(md)
    if why:
        if not force:
            raise PromoteError(
                f"{name}: it is {_state_word(md)}: "
                f"{why}. --force promotes it anyway: its data becomes authoritative and "
                f"the peer will need a full sync from it")
        forced.append(f"promoted although {why}")
    if connected:
        peer = resource.peer_of(node.name)
        if not force:
            when = ""
            if heard_ago is not None:
                left = max(0.0, resource.ping_timeout_s - heard_ago)
                when = (f" (last heard from {heard_ago:.1f} s ago; if it is gone, it is "
                        f"declared so {left:.1f} s from now, at ping-timeout "
                        f"{resource.ping_timeout_s:g} s: `promote --wait` waits for that)")
            raise PromoteError(
                f"{name}: its primary {peer.name} is connected and replicating to it{when}; "
                f"promoting now would make two primaries (split brain). Stop or fence "
                f"{peer.name} first (scripts/failover runs the fence command); --force "
                f"promotes anyway and disconnects it")
        forced.append(f"promoted while the primary {peer.name} was connected "
                      f"(its connection was closed)")
    return forced


# --------------------------------------------------------------------------
# the common end of both paths


def write_atomic(path: Path, text: str) -> None:
    """Replace *path* with *text* durably (a report others may read)."""
    atomic_write(path, text.encode("utf-8"), 0o644)


def _reset_bitmap(md: Metadata, all_dirty: bool) -> None:
    """From now on the OOS bitmap records this node's changes relative to
    the old generation: empty -- or every track, when the peer needs a full
    sync because this image was declared good by force."""
    try:
        bm = Bitmap.open(str(md.paths.bitmap), bytes.fromhex(md.node_uuid), md.track_size)
    except CoreError as e:
        raise PromoteError(f"{md.resource}: cannot open the OOS bitmap: {e}") from None
    try:
        bm.clear_all()
        if all_dirty:
            bm.set_range(0, md.device_size)
    finally:
        bm.close()


def _volume_names(md: Metadata) -> list[str] | None:
    """The volumes' names by index for the loss report (DESIGN §8), or None
    for a single-volume resource (its report stays as it always was)."""
    names = [str(v["name"]) for v in md.volumes]
    if names in ([], [DEFAULT_VOLUME]):
        return None
    return names


def _become_primary(md: Metadata, resource: Resource, node: Node, view: LossView,
                    forced: list[str], group: dict | None = None) -> Promotion:
    """Write the loss report, then commit the new generation and role."""
    report = build_loss_report(view, resource=resource.name, created_ns=time.time_ns(),
                               volume_names=_volume_names(md), group=group)
    if (md.clean_stop_seq is not None and not report.lost
            and report.consistent_through_seq == md.clean_stop_seq
            and view.last_token_seq <= md.clean_stop_seq):
        # A planned switchover: the primary said it wrote nothing after
        # this seq (DESIGN §7), so the image holds every write there is.
        report = report.with_clean_stop(md.clean_stop_seq,
                                        resource.peer_of(node.name).name)
    path = MetaPaths(node.meta_dir).loss_report
    was_invalid = _inconsistency(md) is not None
    _reset_bitmap(md, all_dirty=was_invalid)
    write_atomic(path, report.to_json())
    with md.update():  # the commit point
        old = md.generation
        md.history = ([old] + [h for h in md.history if h != old])[:HISTORY_MAX]
        md.generation = new_uuid()
        md.bitmap_uuid = old
        # Seqs go on past anything this node heard of: a seq is never reused.
        md.seq_hwm = max(md.seq_hwm, view.last_token_seq, view.applied_through)
        md.role = ROLE_PRIMARY
        md.disk = DISK_UPTODATE
        md.clean_stop_seq = None
        md.outdated = False
        md.invalidated = False
        if was_invalid:
            md.needs_initial_sync = True  # as primary: the peer needs a full sync
    log.info("%s: promoted to Primary: consistent through seq %d, %d writes known lost, "
             "generation %s (was %s)", resource.name, report.consistent_through_seq,
             report.lost_count, md.generation, old)
    return Promotion(resource.name, node.name, md.generation, old, report, str(path), forced)


# --------------------------------------------------------------------------
# promoting a running secondary (control socket handler)


def _drain(sec: "Secondary", timeout: float) -> int:
    """Apply everything that can be applied: every in-order run, and a
    catch-up increment that was committed but not yet applied; at most
    *timeout* seconds."""
    try:
        return sec.apply_all(timeout)
    except DuplexError as e:
        raise PromoteError(f"cannot promote: {e}") from None
    finally:
        sec.promote_waiting = ""


def _group_check(sec: "Secondary", group: bool) -> None:
    """A group member is promoted with its group (to the group's point),
    never alone by accident."""
    if sec.group is not None and not group:
        g = sec.group.group.name
        raise PromoteError(f"{sec.resource.name} is a member of consistency group {g}: "
                           f"`duplex promote {g}` promotes every member on this host to the "
                           f"group's point (the same point on every secondary host)")


def _freeze_group(sec: "Secondary", timeout: float) -> dict:
    """Stop the group's releases and wait until the last one is applied
    everywhere (must-complete), at most *timeout* s. Returns the group
    point for the loss report; ``confirmed`` False when the rendezvous
    master could not confirm every member finished (it is unreachable)."""
    sg = sec.group
    assert sg is not None
    reached = sg.freeze()
    start = time.monotonic()
    deadline = start + timeout
    confirmed = False
    while time.monotonic() < deadline:
        view = sg.status().get("view") or {}
        mine_done = sg.gate.in_progress is None or sec._group_bound_reached() is not None
        if (reached and view.get("frozen") and view.get("update_in_progress") is None
                and view.get("all_joined", True)):
            confirmed = True
            break
        if not sg.connected() and mine_done and time.monotonic() > start + min(5.0, timeout / 2):
            break  # no master to ask: our own release is done, go on and say so
        if not reached and sg.connected():
            reached = sg.freeze()  # the master is back: freeze it
        sec.promote_waiting = (f"{sec.resource.name}: promote: waiting for group "
                               f"{sg.group.name} to finish release {view.get('update_in_progress')}"
                               f" (members {', '.join(view.get('waiting') or []) or '?'})")
        time.sleep(0.05)
    st = sg.gate.status()
    return {"name": sg.group.name, "mode": sg.group.mode, "point_ns": st["released"]["t"],
            "checkpoint": st["released"]["n"], "confirmed": confirmed,
            "resigned": st.get("resigned")}


def _wait_disconnected(sec: "Secondary", wait: float) -> None:
    """Up to *wait* seconds for the primary's connection to go (a dead
    primary behind a cut link is declared gone at ping-timeout)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(link.alive() for link in tuple(sec.links)):
        heard = min((link.heard_ago() for link in tuple(sec.links)), default=0.0)
        sec.promote_waiting = (f"{sec.resource.name}: promote: waiting for the primary's "
                               f"connection to go (last heard from {heard:.1f} s ago, "
                               f"ping-timeout {sec.resource.ping_timeout_s:g} s)")
        time.sleep(0.1)
    sec.promote_waiting = ""


def promote_running(sec: "Secondary", force: bool = False,
                    timeout: float = DEFAULT_TIMEOUT, group: bool = False,
                    wait: float = 0.0) -> dict:
    """Promote the secondary daemon *sec* in place; returns
    :meth:`Promotion.to_dict`. The caller (``replicator.node``) stops the
    daemon after a successful return. On failure (also when applying does
    not finish within *timeout* seconds) the daemon stays a secondary and
    accepts its primary again."""
    _group_check(sec, group)
    if not _promoting.acquire(blocking=False):
        raise PromoteError(f"{sec.resource.name}: a promotion is already in progress")
    try:
        if not force and wait > 0:
            _wait_disconnected(sec, wait)
        # Refuse new connections before looking at the current ones, so
        # that no primary slips in between the check and the stop.
        was_receiving = sec.receiving
        sec.receiving = False
        try:
            links = [link for link in tuple(sec.links) if link.alive()]
            heard = min((link.heard_ago() for link in links), default=None)
            forced = check_promotable(sec.md, sec.resource, sec.node,
                                      connected=bool(links), force=bool(force),
                                      heard_ago=heard)
        except BaseException:
            sec.receiving = was_receiving
            raise
        try:
            # A handshake still under way re-checks sec.receiving under the
            # secondary's lock, so no link can join after this.
            sec.stop_receiving("promoted to Primary")
            point = _freeze_group(sec, timeout) if sec.group is not None else None
            if _inconsistency(sec.md) is None:
                _drain(sec, timeout)
            else:
                # Forced past an invalid image: applying records on top of
                # it (maybe under a half-written catch-up increment) would
                # not make it valid; it is declared good as it is.
                log.warning("%s: promoting an invalid image by force: nothing more is "
                            "applied", sec.resource.name)
            # No link feeds the queue any more and every in-order run is
            # applied: the view is final.
            view = sec.loss_view()
            result = _become_primary(sec.md, sec.resource, sec.node, view, forced, point)
            if sec.group is not None:
                sec.group.gate.promote_to(point["point_ns"])
                sec.group.stop()  # a primary now: it rejoins as one when it starts
        except BaseException:
            sec.receiving = was_receiving  # still a secondary: let the primary back
            raise
        return result.to_dict()
    finally:
        _promoting.release()


# --------------------------------------------------------------------------
# promoting a stopped secondary


def _take_daemon_lock(node: Node, resource: Resource) -> int:
    """Hold the meta-dir's daemon lock (the one ``duplex up`` holds), so no
    daemon starts while this command changes the node. Returns its fd."""
    path = MetaPaths(node.meta_dir).lock
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise PromoteError(f"{path}: cannot open the daemon lock: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PromoteError(f"{resource.name} is running on node {node.name} (a process holds "
                           f"{path}) but does not answer on its control socket; "
                           f"wait for it to start, or stop it, and try again") from None
    return fd


def _apply_journal(sec: "Secondary", timeout: float = DEFAULT_TIMEOUT,
                   progress: Callable[[str], None] | None = None) -> int:
    """Apply every in-order run of the replayed journal to the image, make
    it durable and checkpoint. Everything replayed was committed, so every
    complete run may be applied. A run that fails (a full or failing disk)
    is retried with backoff for at most *timeout* seconds, then
    PromoteError names the seq, the error and what to do. Returns the
    applied seq."""
    from replicator.secondary.daemon import ApplyFailed

    q = sec.pending
    name = sec.resource.name
    start = time.monotonic()
    delay = _RETRY[0]
    last_note = 0.0
    while True:
        try:
            if not sec.apply_next_run():
                break
            delay = _RETRY[0]
            continue
        except ApplyFailed as e:
            error = str(e).removeprefix("applying ")  # "cannot apply seq N: ..."
        now = time.monotonic()
        if now - start >= timeout:
            raise PromoteError(
                f"{name}: cannot promote: gave up after {timeout:g} s: applied through seq "
                f"{q.applied_through}, and cannot apply {error}; free space on "
                f"(or repair) the image's device and run promote again (the journal keeps "
                f"every record), or give promote a longer --timeout")
        if progress is not None and now - last_note >= 5.0:
            last_note = now
            progress(f"{name}: promote: applied through seq {q.applied_through}, and cannot "
                     f"apply {error}; retrying ({now - start:.0f} s of {timeout:g} s)")
        time.sleep(min(delay, max(0.0, timeout - (now - start))))
        delay = min(delay * 2, _RETRY[1])
    try:
        sec.sync_images()  # every volume's image
    except OSError as e:
        raise PromoteError(f"{name}: cannot promote: fdatasync of the image "
                           f"{e.filename or sec.node.device} "
                           f"failed: {e.strerror}; the journal was kept (applied through seq "
                           f"{sec.journal.applied_seq}): repair the device and run promote "
                           f"again") from None
    if q.applied_through > sec.journal.applied_seq:
        sec.journal.checkpoint(q.applied_through, q.applied_token)
    return q.applied_through


def promote_offline(config_path: str, resource: Resource, node: Node,
                    force: bool = False, timeout: float = DEFAULT_TIMEOUT,
                    progress: Callable[[str], None] | None = None,
                    group: bool = False) -> dict:
    """Promote this node while its daemon is stopped: replay and apply its
    journal here (at most *timeout* seconds), then the same report and
    metadata as a running one."""
    from replicator.secondary.daemon import Secondary

    lock_fd = _take_daemon_lock(node, resource)
    try:
        md = load_metadata(node.meta_dir, resource.name, node.name)
        if md.role == ROLE_PRIMARY:
            check_promotable(md, resource, node, connected=False, force=force)  # raises
        # Opening replays the journal and redoes a committed catch-up
        # increment (as starting the daemon would), which may make an
        # Inconsistent image consistent: check after it.
        sec = Secondary.open(config_path, resource.name, node.name)
        try:
            _group_check(sec, group)
            forced = check_promotable(sec.md, resource, node, connected=False, force=force)
            if _inconsistency(sec.md) is None:
                # A group member: its journal applies up to its persisted
                # released point (the pending queue's bound), no further.
                applied = _apply_journal(sec, timeout, progress)
                log.info("%s: journal applied through seq %d", resource.name, applied)
            sec.stop_receiving("promoted")  # also lets go of the bitmap file
            point = None
            if sec.group is not None:
                st = sec.group.gate.status()
                point = {"name": sec.group.group.name, "mode": sec.group.group.mode,
                         "point_ns": st["released"]["t"], "checkpoint": st["released"]["n"],
                         "confirmed": False, "resigned": st.get("resigned")}
            result = _become_primary(sec.md, resource, node, sec.pending.loss_view(), forced,
                                     point)
        finally:
            sec.stop_receiving("promoted")
            sec.journal.close()
            sec.close_images()
            if sec.claim is not None:
                sec.claim.close()
        return result.to_dict()
    finally:
        os.close(lock_fd)


# --------------------------------------------------------------------------
# what the CLI and scripts/failover call


def promote(config: Config, resource: Resource, node: Node, force: bool = False,
            timeout: float = DEFAULT_TIMEOUT,
            progress: Callable[[str], None] | None = None, group: bool = False,
            wait: float = 0.0) -> Promotion:
    """Promote *node*: through its daemon when it runs, offline otherwise.
    Applying may take at most *timeout* seconds; *progress* gets a line
    every few seconds saying what the promotion waits for."""
    from replicator.control import NotRunningError, request

    try:
        st = request(node.meta_dir, "status", resource=resource.name, timeout=10)
    except NotRunningError:
        return Promotion.from_dict(promote_offline(config.path, resource, node, force,
                                                   timeout, progress, group))
    if st.get("role") == ROLE_PRIMARY:
        raise PromoteError(f"{resource.name}: node {node.name} is already running as Primary")
    done = threading.Event()
    if progress is not None:
        threading.Thread(target=_relay_progress, args=(node, resource, done, progress),
                         name="duplex-promote-progress", daemon=True).start()
    try:
        reply = request(node.meta_dir, "promote", resource=resource.name,
                        timeout=2 * timeout + wait + 30, force=bool(force), timeout_s=timeout,
                        group=bool(group), wait_s=float(wait))
    finally:
        done.set()
    return Promotion.from_dict(reply)


def promote_group(config: Config, group: Group, node_name: str | None, force: bool = False,
                  timeout: float = DEFAULT_TIMEOUT,
                  progress: Callable[[str], None] | None = None,
                  wait: float | None = None) -> list[Promotion]:
    """``duplex promote GROUP``: promote every member of *group* whose
    secondary is on this host, each to the group's point (the rendezvous
    master is frozen first, so every secondary host ends at the same point)."""
    me = local_node_name(config, node_name)
    members = [config.resource(r) for r in group.resources if me in config.resource(r).nodes]
    if not members:
        raise PromoteError(f"{config.path}: node {me} holds no member of group {group.name} "
                           f"(members: {', '.join(group.resources)}); use --node NAME")
    return [promote(config, r, r.nodes[me], force, timeout, progress, group=True,
                    wait=r.ping_timeout_s if wait is None else wait)
            for r in members]


def _relay_progress(node: Node, resource: Resource, done: threading.Event,
                    progress: Callable[[str], None]) -> None:
    """While a running daemon promotes: pass on what it says it waits for
    (status ``promote_waiting``), each new line once."""
    from replicator.control import request

    said = ""
    while not done.wait(1.0):
        try:
            st = request(node.meta_dir, "status", resource=resource.name, timeout=2)
        except DuplexError:
            continue  # the daemon is busy or going: the promote reply tells
        line = st.get("promote_waiting") or ""
        if line and line != said and not done.is_set():
            said = line
            progress(line)


def demote_handed_over(md: Metadata, resource: Resource) -> None:
    """A running Primary that handed over cleanly (``duplex secondary``,
    replicator/primary/admin.py): role Secondary, disk **Consistent** (it
    holds exactly what its peer holds: every write was applied there), the
    generations and the (empty) OOS bitmap kept. The journal starts over
    first, as in :func:`demote`: what it holds belongs to a history before
    this node was primary."""
    from replicator.secondary.journal import Journal, JournalError

    try:
        Journal.create(str(md.paths.journal), bytes.fromhex(md.node_uuid),
                       resource.journal_size, overwrite=True).close()
    except JournalError as e:
        raise PromoteError(f"{resource.name}: handed over, but cannot start the journal "
                           f"over: {e}") from None
    with md.update():
        md.role = ROLE_SECONDARY
        md.disk = DISK_CONSISTENT
    log.info("%s: handed over: now Secondary (Consistent)", resource.name)


def demote(config: Config, resource: Resource, node: Node) -> Metadata:
    """Make a stopped Primary a Secondary that must resync from its peer.

    Refuses while the resource runs here (it may have clients) or is still
    attached. Returns the saved metadata.
    """
    from replicator.control import is_running
    from replicator.secondary.journal import Journal, JournalError

    paths = MetaPaths(node.meta_dir)
    stop_first = (f"stop it first (systemctl stop duplex@{resource.name}, or stop "
                  f"`duplex up {resource.name}`): demote needs a Primary with no clients")
    if is_running(node.meta_dir):
        raise PromoteError(f"{resource.name} is running on node {node.name}; {stop_first}")
    lock_fd = _take_daemon_lock(node, resource)
    try:
        md = load_metadata(node.meta_dir, resource.name, node.name)
        if md.role != ROLE_PRIMARY:
            raise PromoteError(f"{resource.name}: node {node.name} is already {md.role}; "
                               f"nothing to demote")
        from replicator.attach import attach_records
        held = attach_records(node)  # every volume's (attach.json, attach-NAME.json)
        if held:
            raise PromoteError(f"{resource.name}: node {node.name} still has its export "
                               f"attached ({', '.join(map(str, held))}); run `duplex detach "
                               f"{resource.name}` first")
        # A journal left from before this node was primary holds another
        # history's records: replaying them later would corrupt the image.
        try:
            Journal.create(str(paths.journal), bytes.fromhex(md.node_uuid),
                           resource.journal_size, overwrite=True).close()
        except JournalError as e:
            raise PromoteError(f"{resource.name}: cannot start the journal over: {e}") from None
        with md.update():
            md.role = ROLE_SECONDARY
            md.disk = DISK_OUTDATED
        log.info("%s: demoted to Secondary (Outdated until it resyncs from its peer)",
                 resource.name)
        return md
    finally:
        os.close(lock_fd)
