"""``duplex``: the command line.

    duplex [--config FILE] [--node NAME] [-v] COMMAND ... [--config FILE] ...

Each command is one small function ``cmd_<name>(args, ctx) -> int``,
registered in :func:`build_parser`; later commands (connect, verify) add
a function and a subparser. The global options are taken before or after
the command (as drbdadm does). A :class:`DuplexError` anywhere prints
``duplex: error: <message>`` and exits 1, an OSError ``duplex: error:
COMMAND: PATH: reason``; anything else (a bug) one ``internal error`` line,
its traceback only with -v. Usage errors exit 2. No traceback reaches a
user.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from replicator.config import Config, Node, Resource, load_config, local_node_name, select_node
from replicator.errors import DuplexError
from replicator.sizes import format_size



@dataclass
class Context:
    """What every command gets: the loaded config and the --node choice."""

    config: Config
    node_name: str | None

    def resolve(self, resource_name: str) -> tuple[Resource, Node]:
        """The resource and this host's node of it."""
        resource = self.config.resource(resource_name)
        return resource, select_node(resource, self.node_name)


def _node_module():
    """replicator.node, imported only by the commands that need it."""
    try:
        node_mod = importlib.import_module("replicator.node")
    except ModuleNotFoundError as e:
        if e.name != "replicator.node":
            raise
        raise DuplexError("this installation has no replicator.node module "
                          "(the replication engine is missing)") from None
    return node_mod


# --------------------------------------------------------------------------
# commands


def cmd_create_md(args: argparse.Namespace, ctx: Context) -> int:
    """Create this node's metadata, bitmap, activity log and journal: the
    node's lock first, then every check, then the whole set at once (see
    :func:`replicator.node.create_metadata_set`)."""
    from replicator.control import NodeLock

    resource, node = ctx.resolve(args.resource)
    meta = Path(node.meta_dir)
    try:
        meta.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise DuplexError(f"{meta}: cannot create the meta-dir: {e.strerror}") from None
    node_mod = _node_module()
    with NodeLock(meta, resource.name, hint="stop it before create-md"):
        from replicator.metadata import logical_size
        from replicator.volumes import claim_volumes, read_volumes
        volumes = read_volumes(node)
        # A device in use (mounted, held, another Duplex's) is refused by name.
        claim_volumes(resource, node).close()
        size = logical_size(volumes, resource.track_size)
        md = node_mod.create_metadata_set(ctx.config, resource, node, size,
                                          args.assume_clean, args.force,
                                          volumes if node.multi_volume else None)
    print(f"{resource.name}: created metadata for node {node.name} in {node.meta_dir}")
    tail = (f"track size {format_size(resource.track_size)}, disk {md.disk}"
            + (", needs initial sync" if md.needs_initial_sync else ""))
    if node.multi_volume:
        for v, rec in zip(node.volumes, volumes):
            print(f"  volume {v.name}: device {v.device} ({format_size(rec['size'])})")
        print(f"  {tail}")
    else:
        print(f"  device {node.device} ({format_size(size)}), {tail}")
    return 0


def cmd_up(args: argparse.Namespace, ctx: Context) -> int:
    """Run this node's side of the resource in the foreground."""
    resource, node = ctx.resolve(args.resource)
    return int(_node_module().run_up(ctx.config, resource, node, args.role))


def _status_of(resource: Resource, node: Node, timeout: float) -> dict:
    """A running node's status over its control socket, or the offline
    status from its metadata when it is not running."""
    from replicator.control import ControlError, NotRunningError, lock_holder, request
    from replicator.metadata import ROLE_SECONDARY, load_metadata
    from replicator.status import offline_status

    stopped = False  # no process owns the node: its files may be read
    try:
        return request(node.meta_dir, "status", resource=resource.name, timeout=timeout)
    except NotRunningError:
        holder = lock_holder(node.meta_dir)
        stopped = holder is None
        # A process owns the node but serves no socket (yet): starting up,
        # or create-md/promote at work. Not "not running".
        reason = ("not running" if holder is None else
                  f"not answering: pid {holder} holds the node (starting, or "
                  f"create-md/promote at work)")
    except ControlError as e:
        reason = str(e)
    try:
        md = load_metadata(node.meta_dir, resource.name, node.name)
    except DuplexError as e:
        return offline_status(resource, node, None, f"{reason}; {e}")
    if md.role == ROLE_SECONDARY and stopped and md.paths.journal.exists():
        from replicator.secondary.journal import image_behind_journal

        try:
            behind = image_behind_journal(md.paths.journal, bytes.fromhex(md.node_uuid))
        except DuplexError as e:
            behind = str(e)
        if behind:
            reason = f"{reason}; {behind}"
    return offline_status(resource, node, md, reason)


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    """Show the status of one resource, or of every resource of this node."""
    from replicator.status import format_line, format_lines, format_status, format_statuses, watch_frame

    if args.resource in ctx.config.groups and args.resource not in ctx.config.resources:
        return _group_status(args, ctx)
    if args.resource:
        targets = [ctx.resolve(args.resource)]
    else:
        me = local_node_name(ctx.config, ctx.node_name)
        targets = [(r, r.nodes[me]) for r in ctx.config.resources_of_node(me)]
        if not targets:
            raise DuplexError(f"{ctx.config.path}: no resource has a node called {me!r} "
                              f"(use --node NAME)")

    def render() -> str:
        # Fetch and format before anything is written: the old frame stays
        # on screen while the status is fetched, so nothing flickers.
        ds = [_status_of(r, n, args.timeout) for r, n in targets]
        if args.json:
            out = ds[0] if args.resource else ds
            return json.dumps(out, indent=None if args.watch else 2)
        if args.verbose:  # the table; by default one line per resource (drbdadm status)
            return format_status(ds[0]) if args.resource else format_statuses(ds)
        return format_line(ds[0]) if args.resource else format_lines(ds)

    if not args.watch:
        if not args.check:
            print(render())
            sys.stdout.flush()
            return 0
        return _check(args, targets)
    # On a terminal each refresh overwrites the previous one in place (one
    # write); to a pipe or file, or as JSON, frames are plain text: JSON one
    # line each, human frames separated by a blank line.
    redraw = sys.stdout.isatty() and not args.json
    try:
        while True:
            text = render()
            if redraw:
                header = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} "
                          f"(every {args.interval:g}s, Ctrl-C to stop)")
                sys.stdout.write(watch_frame(text, header=header))
            elif args.json:
                sys.stdout.write(text + "\n")
            else:
                sys.stdout.write(text + "\n\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _group_status(args: argparse.Namespace, ctx: Context) -> int:
    """``duplex status GROUP``: the group from this host's members."""
    from replicator.group.view import format_group_status, group_status

    group = ctx.config.group(args.resource)
    me = local_node_name(ctx.config, ctx.node_name)

    def render() -> str:
        doc = group_status(ctx.config, group, me, lambda r: _status_of(
            ctx.config.resource(r), ctx.config.resource(r).nodes[me], args.timeout))
        if not doc["members"]:
            raise DuplexError(f"{ctx.config.path}: node {me} holds no member of group "
                              f"{group.name} (members: {', '.join(group.resources)}); "
                              f"use --node NAME")
        return json.dumps(doc, indent=None if args.watch else 2) if args.json \
            else format_group_status(doc)

    if not args.watch:
        print(render())
        return 0
    try:
        while True:
            print(render() + ("" if args.json else "\n"), flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _check(args: argparse.Namespace, targets: list) -> int:
    """``status --check``: the status as usual, then one line on stderr per
    resource that is not healthy (status.health_problems); exit 1 if any."""
    from replicator.status import format_lines, format_statuses, health_problems

    ds = [_status_of(r, n, args.timeout) for r, n in targets]
    if args.json:
        print(json.dumps(ds[0] if args.resource else ds, indent=2))
    else:
        print(format_statuses(ds) if args.verbose else format_lines(ds))
    sys.stdout.flush()
    sick = 0
    for d in ds:
        problems = health_problems(d)
        if problems:
            sick += 1
            print(f"duplex: {d.get('resource')} on {d.get('node')} is not healthy: "
                  f"{'; '.join(problems)}", file=sys.stderr)
    return 1 if sick else 0


def cmd_events(args: argparse.Namespace, ctx: Context) -> int:
    """``duplex events``: the running nodes' state, then their changes, one
    line each, as ``drbdsetup events2`` (replicator/events.py)."""
    import threading
    from replicator.control import NotRunningError
    from replicator.events import EventStream, EventStreamError, format_event

    if args.resource:
        targets = [ctx.resolve(args.resource)]
    else:
        me = local_node_name(ctx.config, ctx.node_name)
        targets = [(r, r.nodes[me]) for r in ctx.config.resources_of_node(me)]
    out_lock = threading.Lock()

    def show(d: dict) -> None:
        line = (json.dumps(d, separators=(",", ":")) if args.json
                else format_event(d, args.timestamps))
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    streams = []
    for resource, node in targets:
        try:
            streams.append(EventStream(node.meta_dir, resource.name, now=args.now))
        except NotRunningError as e:
            if args.resource:
                raise
            print(f"duplex: {resource.name}: not running on this node: no events",
                  file=sys.stderr)
    if not streams:
        raise DuplexError(f"no resource runs on node {local_node_name(ctx.config, ctx.node_name)}"
                          f" (start one with `duplex up RES`): no events to show")
    marker = None
    for s in streams:  # every node's exists part, then one marker, as events2
        for d in s:
            if d.get("type") == "exists" and d.get("object") == "-":
                marker = d
                break
            show(d)
    if marker is not None:
        show(marker)
    if args.now:
        for s in streams:
            s.close()
        return 0
    failed: list[str] = []

    def follow(s) -> None:
        try:
            for d in s:
                show(d)
            with out_lock:
                print(f"duplex: {s.resource}: the node stopped: its event stream ended",
                      file=sys.stderr, flush=True)
        except EventStreamError as e:
            failed.append(str(e))
            with out_lock:
                print(f"duplex: error: {e}", file=sys.stderr, flush=True)
        finally:
            s.close()

    threads = [threading.Thread(target=follow, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)  # in slices: Ctrl-C stops the command
    return 1 if failed else 0


def cmd_attach(args: argparse.Namespace, ctx: Context) -> int:
    """Give a block device for this node's export; print its path (with
    volume tables: one ``NAME DEVICE`` line per volume attached)."""
    from replicator.attach import attach_volumes

    resource, node = ctx.resolve(args.resource)
    done = attach_volumes(ctx.config, resource, node, volume=args.volume)
    for name, device in done:
        print(f"{name} {device}" if node.multi_volume else device)
    return 0


def cmd_detach(args: argparse.Namespace, ctx: Context) -> int:
    """Undo attach (every attached volume, or the one given)."""
    from replicator.attach import detach_volumes

    resource, node = ctx.resolve(args.resource)
    for name, device in detach_volumes(ctx.config, resource, node, volume=args.volume):
        print(f"{resource.name}: detached volume {name} ({device})" if node.multi_volume
              else f"{resource.name}: detached {device}")
    return 0


def cmd_promote(args: argparse.Namespace, ctx: Context) -> int:
    """Make this node's Secondary the Primary: apply, report losses, new
    generation; for a group, every member on this host, at the group's point."""
    from replicator.promote import promote, promote_group

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.resource in ctx.config.groups and args.resource not in ctx.config.resources:
        group = ctx.config.group(args.resource)
        results = promote_group(ctx.config, group, ctx.node_name, force=args.force,
                                timeout=args.timeout, progress=say, wait=args.wait)
        if args.json:
            print(json.dumps({"group": group.name, "members": [r.to_dict() for r in results]},
                             indent=2))
        else:
            print("\n".join(r.to_text() for r in results), end="")
        return 0
    resource, node = ctx.resolve(args.resource)
    result = promote(ctx.config, resource, node, force=args.force, timeout=args.timeout,
                     progress=say,
                     wait=resource.ping_timeout_s if args.wait is None else args.wait)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.to_text(), end="")
    return 0


def cmd_down(args: argparse.Namespace, ctx: Context) -> int:
    """Stop this node's running `duplex up RES` cleanly, from another shell."""
    from replicator.node import stop_running

    resource, node = ctx.resolve(args.resource)
    print(stop_running(resource, node, timeout=args.timeout,
                       progress=lambda line: print(line, file=sys.stderr, flush=True)))
    return 0


def cmd_demote(args: argparse.Namespace, ctx: Context) -> int:
    """Make this node's stopped Primary a Secondary that resyncs from its peer."""
    from replicator.promote import demote

    resource, node = ctx.resolve(args.resource)
    md = demote(ctx.config, resource, node)
    print(f"{resource.name}: node {node.name} is now Secondary, disk {md.disk}: it must "
          f"resync from its peer before its image counts as a copy")
    print(f"  next: `duplex up {resource.name}` starts it as secondary")
    return 0


def cmd_verify(args: argparse.Namespace, ctx: Context) -> int:
    """Compare both sides track by track while replication runs; exit 0
    when they agree, 1 when tracks differ (listed)."""
    from replicator.control import request
    from replicator.sizes import format_size

    resource, node = ctx.resolve(args.resource)
    request(node.meta_dir, "verify", resource=resource.name, fix=args.fix)
    show_bar = sys.stderr.isatty() or args.progress
    while True:
        st = request(node.meta_dir, "verify-status", resource=resource.name)
        if show_bar:
            done, total = st["done_bytes"], max(1, st["total_bytes"])
            filled = int(30 * done / total)
            sys.stderr.write(f"\rverify [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{100 * done / total:5.1f}%  {format_size(done)} of "
                             f"{format_size(total)}")
            sys.stderr.flush()
        if not st["running"]:
            break
        time.sleep(0.2)
    if show_bar:
        sys.stderr.write("\n")
    if st.get("failure"):
        raise DuplexError(f"{resource.name}: verify failed: {st['failure']}")
    if args.json:
        print(json.dumps(dict(st, resource=resource.name), indent=2))
    else:
        if not st["differing"]:
            print(f"{resource.name}: verified {format_size(st['total_bytes'])} in "
                  f"{st['seconds']} s: both sides hold the same data")
        else:
            print(f"{resource.name}: {format_size(st['differing_bytes'])} differ "
                  f"({len(st['differing'])} ranges):")
            for r in st["differing"]:
                print(f"  {'volume ' + r['volume'] + ' ' if 'volume' in r else ''}"
                      f"offset {r['offset']} length {r['length']}")
            print("  marked out of sync: a catch-up resends them" if st["marked_out_of_sync"]
                  else f"  run `duplex verify {resource.name} --fix` to resend them")
        if st["skipped"]:
            print(f"  {len(st['skipped'])} ranges were written to throughout and not compared")
    return 1 if st["differing"] else 0


def cmd_connect(args: argparse.Namespace, ctx: Context) -> int:
    """Reconnect a node the admin disconnected (DESIGN §7); resolve a refused
    connection: with --discard-my-data this node (the loser of a split
    brain) gives up its changes and resyncs from its peer."""
    from replicator.control import NotRunningError, request
    from replicator.metadata import ROLE_PRIMARY, load_metadata

    resource, node = ctx.resolve(args.resource)
    if not args.discard_my_data:
        try:  # a secondary whose applying failed retries it now
            reply = request(node.meta_dir, "connect", resource=resource.name)
        except DuplexError:  # not running, or a primary (no such request there)
            reply = {}
        if reply.get("reconnecting"):  # after `duplex disconnect` (DESIGN §7)
            print(f"{resource.name}: node {node.name} connects to its peer again (it was "
                  f"disconnected by the admin)")
            return 0
        if reply.get("apply_retried"):
            print(f"{resource.name}: retrying the failed apply now (it failed: "
                  f"{reply.get('apply_error')}); `duplex status {resource.name}` shows "
                  f"whether it resumed")
            return 0
        print(f"{resource.name}: the nodes retry connecting on their own; to end a split "
              f"brain, run `duplex connect {resource.name} --discard-my-data` on the node "
              f"whose changes are to be dropped")
        return 0
    md = load_metadata(node.meta_dir, resource.name, node.name)
    if md.role == ROLE_PRIMARY:
        raise DuplexError(f"{resource.name}: node {node.name} is Primary: demote it first "
                          f"(`duplex demote {resource.name}`), then discard its data")
    try:
        request(node.meta_dir, "connect", resource=resource.name, discard_my_data=True)
        where = "the running secondary"
    except NotRunningError:
        from replicator.control import NodeLock
        # Owning the node, so no `up` starts from the metadata half-changed.
        with NodeLock(node.meta_dir, resource.name, hint="try again"):
            md = load_metadata(node.meta_dir, resource.name, node.name)
            with md.update():
                md.discard_my_data = True
        where = "the metadata (applies at the next `duplex up`)"
    print(f"{resource.name}: node {node.name} will discard its own changes and resync from "
          f"its peer at the next handshake (set in {where})")
    return 0


def _admin_request(args: argparse.Namespace, ctx: Context, cmd: str, timeout: float = 10.0,
                   **kw) -> tuple[Resource, Node, dict]:
    """Send an admin command (DESIGN §7) to this node's running daemon;
    a stopped node is named as such."""
    from replicator.control import NotRunningError, request

    resource, node = ctx.resolve(args.resource)
    try:
        return resource, node, request(node.meta_dir, cmd, resource=resource.name,
                                       timeout=timeout, **kw)
    except NotRunningError:
        raise DuplexError(f"{resource.name} is not running on node {node.name}: `duplex "
                          f"{cmd}` acts on a running node (start it with `duplex up "
                          f"{resource.name}`)") from None


def cmd_disconnect(args: argparse.Namespace, ctx: Context) -> int:
    """StandAlone on purpose until `duplex connect` (not kept across down/up)."""
    _, _, reply = _admin_request(args, ctx, "disconnect")
    print(reply["message"])
    return 0


def cmd_invalidate(args: argparse.Namespace, ctx: Context) -> int:
    """Discard this secondary's data: a full sync from the primary follows."""
    resource, node, _ = _admin_request(args, ctx, "invalidate")
    print(f"{resource.name}: node {node.name}'s data is invalidated (disk Inconsistent): a "
          f"full sync from its peer follows; `duplex status {resource.name}` shows it")
    return 0


def cmd_invalidate_remote(args: argparse.Namespace, ctx: Context) -> int:
    """On the primary: discard the peer's data, a full sync to it."""
    resource, node, reply = _admin_request(args, ctx, "invalidate-remote")
    print(f"{resource.name}: the data of {reply['peer']} is invalidated: every track "
          f"({format_size(reply['out_of_sync_bytes'])}) is sent to it again")
    return 0


def cmd_pause_sync(args: argparse.Namespace, ctx: Context) -> int:
    """On the primary: no increment goes out until resume-sync."""
    resource, node, reply = _admin_request(args, ctx, "pause-sync")
    print(f"{resource.name}: sync paused (by the admin) on node {node.name} (replication "
          f"{reply['replication']}); `duplex resume-sync {resource.name}` resumes it")
    return 0


def cmd_resume_sync(args: argparse.Namespace, ctx: Context) -> int:
    """On the primary: the paused sync goes on."""
    resource, node, reply = _admin_request(args, ctx, "resume-sync")
    print(f"{resource.name}: sync resumed on node {node.name} (replication "
          f"{reply['replication']})")
    return 0


def cmd_outdate(args: argparse.Namespace, ctx: Context) -> int:
    """On a secondary: mark its data Outdated (promote then needs --force);
    running through its daemon, stopped in its metadata."""
    from replicator.control import NodeLock, NotRunningError, request
    from replicator.metadata import ROLE_PRIMARY, load_metadata

    resource, node = ctx.resolve(args.resource)
    try:
        request(node.meta_dir, "outdate", resource=resource.name)
        where = "the running secondary"
    except NotRunningError:
        # Owning the node, so no `up` starts from the metadata half-changed.
        with NodeLock(node.meta_dir, resource.name, hint="try again"):
            md = load_metadata(node.meta_dir, resource.name, node.name)
            if md.role == ROLE_PRIMARY:
                raise DuplexError(f"{resource.name}: node {node.name} is Primary: its data is "
                                  f"the newest there is; outdate marks a Secondary's") from None
            with md.update():
                md.outdated = True
        where = "its metadata (the node is stopped)"
    print(f"{resource.name}: node {node.name}'s data is Outdated (set in {where}): `duplex "
          f"promote {resource.name}` refuses it without --force until it has caught up with "
          f"its primary")
    return 0


def cmd_secondary(args: argparse.Namespace, ctx: Context) -> int:
    """Planned switchover on the running primary: drain the peer, hand over
    cleanly (it learns the last seq), become Secondary."""
    from replicator.control import NotRunningError, request

    resource, node = ctx.resolve(args.resource)
    try:
        reply = request(node.meta_dir, "secondary", resource=resource.name,
                        timeout=args.timeout + 40, timeout_s=args.timeout)
    except NotRunningError:
        raise DuplexError(f"{resource.name} is not running on node {node.name}: a stopped "
                          f"Primary is made Secondary with `duplex demote {resource.name}` "
                          f"(it then resyncs from its peer)") from None
    print(f"{resource.name}: node {node.name} handed over to {reply['peer']} at seq "
          f"{reply['handed_over_at']} (a clean stop: {reply['peer']} has applied every write) "
          f"and is now Secondary")
    print(f"  next: `duplex promote {resource.name}` on {reply['peer']} (nothing is lost)")
    return 0


# --------------------------------------------------------------------------
# parser


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return v


def _global_options(p: argparse.ArgumentParser, top: bool) -> None:
    """--config, --node, -v: on the main parser (*top*, with defaults) or on
    every subcommand (defaults suppressed, so they only set what is given)."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--config", metavar="FILE",
                   help="configuration file (default: $DUPLEX_CONFIG or /etc/duplex/duplex.toml)",
                   **d)
    p.add_argument("--node", metavar="NAME",
                   help="this host's node name in the config (default: the host name)", **d)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging",
                   **({"default": False} if top else d))


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; each subcommand's ``func`` is its cmd_ function."""
    p = argparse.ArgumentParser(
        prog="duplex",
        description="Asynchronous, write-ordered replication of a block device.",
    )
    _global_options(p, top=True)
    # The same options after the subcommand too, as drbdadm takes them
    # anywhere: SUPPRESS keeps a subparser from overwriting a value given
    # before the subcommand with its default.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace, Context], int],
                help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        sp.set_defaults(func=func)
        return sp

    sp = command("create-md", cmd_create_md, "create this node's metadata for a resource")
    sp.add_argument("resource", metavar="RES")
    sp.add_argument("--assume-clean", action="store_true",
                    help="both devices are already identical (e.g. new and zeroed): no initial sync")
    sp.add_argument("--force", action="store_true",
                    help="overwrite existing metadata (discards replication state)")

    sp = command("up", cmd_up, "run this node's side of a resource in the foreground")
    sp.add_argument("resource", metavar="RES")
    sp.add_argument("--role", choices=("primary", "secondary"),
                    help="the role to start in; must match the metadata's, except on fresh "
                         "metadata (just made by create-md), where it is recorded")

    sp = command("promote", cmd_promote,
                 "failover: make this node's Secondary the Primary and write the loss report")
    sp.add_argument("resource", metavar="RES|GROUP",
                    help="a resource, or a consistency group: every member on this host")
    sp.add_argument("--force", action="store_true",
                    help="promote even while the primary is connected, or when this node's "
                         "image is Inconsistent or Outdated")
    sp.add_argument("--json", action="store_true",
                    help="print the result and loss report as JSON")
    sp.add_argument("--timeout", metavar="SECONDS", type=_positive_float, default=60.0,
                    help="give up (and say why) when applying the journal takes longer "
                         "than this (default 60)")
    sp.add_argument("--wait", metavar="SECONDS", type=_non_negative_float, default=None,
                    help="while the primary still looks connected, wait this long for its "
                         "connection to go before refusing (default: the resource's "
                         "ping-timeout; a primary that died behind a cut link is declared "
                         "gone then); 0 refuses at once")

    sp = command("primary", cmd_promote,
                 "make this node Primary (DRBD's verb): the same as promote; `primary --force` "
                 "makes the first Primary of a fresh pair (both started Secondary), whose "
                 "data then counts: the peer gets a full sync")
    sp.add_argument("resource", metavar="RES|GROUP")
    sp.add_argument("--force", action="store_true",
                    help="as promote --force (a fresh pair: this node's data counts)")
    sp.add_argument("--json", action="store_true", help="print the result as JSON")
    sp.add_argument("--timeout", metavar="SECONDS", type=_positive_float, default=60.0,
                    help="as promote --timeout (default 60)")
    sp.add_argument("--wait", metavar="SECONDS", type=_non_negative_float, default=None,
                    help="as promote --wait")

    sp = command("secondary", cmd_secondary,
                 "planned switchover on the running primary: drain the peer, hand over "
                 "cleanly, become Secondary (then `duplex promote RES` on the peer)")
    sp.add_argument("resource", metavar="RES")
    sp.add_argument("--timeout", metavar="SECONDS", type=_positive_float, default=60.0,
                    help="give up (and stay Primary) when the peer has not applied every "
                         "write within this long (default 60)")

    for name, func, text in (
            ("disconnect", cmd_disconnect,
             "StandAlone on purpose (a primary keeps its writes in the bitmap) until "
             "`duplex connect RES`"),
            ("invalidate", cmd_invalidate,
             "on a secondary: discard this node's data, a full sync from the primary"),
            ("invalidate-remote", cmd_invalidate_remote,
             "on the primary: discard the peer's data, a full sync to it"),
            ("pause-sync", cmd_pause_sync, "on the primary: pause a catch-up or initial sync"),
            ("resume-sync", cmd_resume_sync, "on the primary: resume a paused sync"),
            ("outdate", cmd_outdate,
             "on a secondary: mark its data Outdated (promote refuses it without --force)")):
        sp = command(name, func, text)
        sp.add_argument("resource", metavar="RES")

    sp = command("down", cmd_down,
                 "stop this node's running `duplex up RES` cleanly (as systemctl stop does)")
    sp.add_argument("resource", metavar="RES")
    sp.add_argument("--timeout", metavar="SECONDS", type=_positive_float, default=None,
                    help="give up after this long (default: the resource's drain-timeout "
                         "plus 20 s)")

    sp = command("demote", cmd_demote,
                 "make this node's stopped Primary a Secondary (it resyncs from its peer)")
    sp.add_argument("resource", metavar="RES")

    sp = command("verify", cmd_verify,
                 "compare both sides' data online (run on the primary)")
    sp.add_argument("resource", metavar="RES")
    sp.add_argument("--fix", action="store_true",
                    help="mark differing tracks out of sync so that they are resent")
    sp.add_argument("--json", action="store_true", help="the result as JSON")
    sp.add_argument("--progress", action="store_true",
                    help="show the progress bar even when stderr is not a terminal")

    sp = command("connect", cmd_connect,
                 "reconnect after `duplex disconnect`; with --discard-my-data, resolve a "
                 "split brain on the losing node")
    sp.add_argument("resource", metavar="RES")
    sp.add_argument("--discard-my-data", action="store_true",
                    help="give up this node's changes and resync from the peer")

    sp = command("status", cmd_status,
                 "show role, connection, disk, lag and sync progress: one line per resource "
                 "(-v/--verbose: the full table)")
    sp.add_argument("resource", metavar="RES", nargs="?",
                    help="one resource (default: every resource of this node)")
    sp.add_argument("--json", action="store_true",
                    help="JSON: an object for RES, a list without it")
    sp.add_argument("--watch", action="store_true",
                    help="redraw every --interval seconds until Ctrl-C")
    sp.add_argument("--interval", metavar="SECONDS", type=_positive_float, default=2.0,
                    help="the --watch refresh interval (default 2)")
    sp.add_argument("--check", action="store_true",
                    help="exit 1 unless every resource shown is healthy (for monitoring)")
    sp.add_argument("--timeout", metavar="SECONDS", type=_positive_float, default=5.0,
                    help=argparse.SUPPRESS)

    sp = command("events", cmd_events,
                 "the state of a running node, then one line per change (as drbdsetup events2)")
    sp.add_argument("resource", metavar="RES", nargs="?",
                    help="one resource (default: every resource running on this node)")
    sp.add_argument("--now", action="store_true",
                    help="stop after the current state (the exists lines and `exists -`)")
    sp.add_argument("--timestamps", action="store_true",
                    help="start each text line with the event's time (ISO 8601)")
    sp.add_argument("--json", action="store_true",
                    help="one JSON object per line (always with its time)")

    sp = command("attach", cmd_attach, "give a block device for this node's export; print it")
    sp.add_argument("resource", metavar="RES")
    sp.add_argument("--volume", metavar="NAME",
                    help="only this volume (default: every volume, one line each)")

    sp = command("detach", cmd_detach, "remove the block device made by attach")
    sp.add_argument("resource", metavar="RES")
    sp.add_argument("--volume", metavar="NAME", help="only this volume (default: every one)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``duplex`` console script. Returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage error (2) or --help (0)
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        ctx = Context(config=load_config(args.config), node_name=args.node)
        rc = args.func(args, ctx)
        global _DAEMON_RAN
        _DAEMON_RAN = args.command == "up"
        return rc
    except DuplexError as e:
        print(f"duplex: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `duplex status | head`
        return 0
    except OSError as e:
        # A disk or system error no check foresaw (full or read-only disk,
        # I/O error): the file it hit and why, not a traceback.
        from replicator.control import describe_oserror
        logging.getLogger("duplex").debug("%s failed", args.command, exc_info=True)
        print(f"duplex: error: {args.command}: {describe_oserror(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line for the user, the traceback with -v
        logging.getLogger("duplex").debug("%s failed", args.command, exc_info=True)
        print(f"duplex: error: {args.command}: internal error: {type(e).__name__}: {e} "
              f"(a bug; run with -v for the traceback and report it)", file=sys.stderr)
        return 1


_DAEMON_RAN = False  # main() ran `up` to its end


def entry() -> None:
    """The process entry point (console script, ``python -m``): main(),
    then, after ``up``, an exit that skips the interpreter's teardown. The
    daemon has stopped and saved everything by then; the teardown frees
    objects in no set order, and a received frame's buffer still lent to
    the C pending queue crashed it (SIGSEGV after a clean stop: an exit
    status systemd reads as a failure)."""
    rc = main()
    if _DAEMON_RAN:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    entry()
