"""``duplex status GROUP``: the group as this host sees it (DESIGN §13),
derived from the statuses of the members it holds.

A secondary member carries the rendezvous master's view (every member's
held point, completed release and applied seq, the clock skews, what
blocks a release); a primary member carries the checkpoint master's member
list and its clock offset. The document::

    group, mode, node
    members:  [{name, node, role, running, state, connected, seq}]
    point:    {time_ns, time, n, seq: {member: applied seq}} or null
    exposure_seconds   now minus the point's time (null: no point yet)
    released           {n, t}: the last released checkpoint (or limit time)
    update_in_progress the release being applied, or null
    rendezvous         {connected, blocked, waiting, frozen, view_age_seconds}
    clock_skew_seconds the largest measured primary clock offset (null: unknown)
"""
from __future__ import annotations

import time
from typing import Callable

from replicator.config import Config, Group
from replicator.secondary.lossreport import iso_utc


def group_status(config: Config, group: Group, node_name: str,
                 status_of: Callable[[str], dict]) -> dict:
    """The group's status from this host's members (*status_of(resource)*
    gives a member's status document)."""
    rows = []
    view = None
    primary_view = None
    gates = []
    for res in group.resources:
        if node_name not in config.resource(res).nodes:
            continue
        st = status_of(res)
        g = st.get("group") or {}
        rows.append({"name": res, "node": node_name, "role": st.get("role"),
                     "running": st.get("running"), "connection": st.get("connection"),
                     "seq": (st.get("seq") or {}).get("applied"), "group_role": g.get("role"),
                     "connected": g.get("connected"), "last_error": g.get("last_error")})
        if st.get("role") == "Secondary" and g:
            gates.append(g)
            if g.get("view") and (view is None or g.get("role") == "rendezvous master"):
                view = g["view"]
                view_age = g.get("view_age_seconds")
        elif g:
            primary_view = g
    doc: dict = {"group": group.name, "mode": group.mode, "node": node_name,
                 "members": rows, "point": None, "exposure_seconds": None,
                 "released": None, "update_in_progress": None, "rendezvous": None,
                 "clock_skew_seconds": None}
    if view is not None:
        rel = view.get("released") or {}
        members = view.get("members") or {}
        for r in rows:
            m = members.get(r["name"]) or {}
            r["state"] = m.get("state")
        doc["released"] = rel
        doc["update_in_progress"] = view.get("update_in_progress")
        if rel.get("t"):
            doc["point"] = {"time_ns": rel["t"], "time": iso_utc(rel["t"]), "n": rel.get("n"),
                            "seq": {name: m.get("applied_seq") for name, m in members.items()}}
            doc["exposure_seconds"] = round(max(0.0, time.time() - rel["t"] / 1e9), 3)
        skews = [m.get("skew_us") for m in members.values()]
        known = [s for s in skews if s is not None]
        doc["clock_skew_seconds"] = max(known) / 1e6 if known else None
        doc["rendezvous"] = {"blocked": view.get("blocked"), "waiting": view.get("waiting"),
                             "frozen": view.get("frozen"), "view_age_seconds": view_age,
                             "members": members}
    elif gates:  # no master view (not connected yet, or stopped): the persisted points
        rel = max((g.get("released") or {"n": 0, "t": 0} for g in gates),
                  key=lambda r: r.get("n", 0))
        doc["released"] = rel
        doc["update_in_progress"] = next((g["update_in_progress"] for g in gates
                                          if g.get("update_in_progress")), None)
        if rel.get("t"):
            doc["point"] = {"time_ns": rel["t"], "time": iso_utc(rel["t"]), "n": rel.get("n"),
                            "seq": {}}
            doc["exposure_seconds"] = round(max(0.0, time.time() - rel["t"] / 1e9), 3)
    if primary_view is not None:
        doc["checkpoints"] = {"role": primary_view.get("role"),
                              "members": primary_view.get("members"),
                              "last_checkpoint": primary_view.get("last_checkpoint"),
                              "clock_offset_seconds": primary_view.get("clock_offset_seconds"),
                              "mark_error": primary_view.get("mark_error")}
        if doc["clock_skew_seconds"] is None and primary_view.get("clock_offset_seconds") is not None:
            doc["clock_skew_seconds"] = abs(primary_view["clock_offset_seconds"])
    return doc


def format_group_status(doc: dict) -> str:
    """The group status for people."""
    lines = [f"group {doc['group']} ({doc['mode']}) on {doc['node']}"]
    p = doc.get("point")
    if p:
        lines.append(f"  point:     {p['time']} (release {p['n']}), exposure "
                     f"{doc['exposure_seconds']:.3f} s")
    else:
        lines.append("  point:     none released yet")
    if doc.get("update_in_progress"):
        lines.append(f"  applying:  release {doc['update_in_progress']} (images fenced until "
                     f"every member has it)")
    rv = doc.get("rendezvous")
    if rv:
        if rv.get("blocked"):
            lines.append(f"  blocked:   {rv['blocked']}")
        if rv.get("frozen"):
            lines.append("  frozen:    a promotion is under way: nothing new is released")
    skew = doc.get("clock_skew_seconds")
    lines.append("  clocks:    " + ("skew unknown" if skew is None else
                                    f"largest primary offset {skew * 1000:.3f} ms"))
    for r in doc["members"]:
        state = r.get("state") or "-"
        seq = (p or {}).get("seq", {}).get(r["name"]) if p else None
        lines.append(f"  {r['name']:<12} {r.get('role') or '?':<10} {state:<9} "
                     f"group link {'up' if r.get('connected') else 'down'}"
                     + (f", at seq {seq}" if seq is not None else "")
                     + (f" ({r['last_error']})" if r.get("last_error") else ""))
    return "\n".join(lines)
