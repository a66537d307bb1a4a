"""The loss report a promotion writes (DESIGN §7). Pure.

After the primary is lost, the secondary applies every in-order run; the
image is then the primary's exact state after write A (the *consistent
point*). The report says:

* A and its timestamp: the image holds every write up to and including A
  and nothing after it;
* every write known to be lost after A, in order: its address (volume,
  offset, length, op; with several volumes, DESIGN §8, the volume's name
  too, and the offset is within that volume), its timestamp, and whether its data had arrived
  (arrived but unapplied, because an earlier write was missing) -- or
  that it was never announced, so its address is unknown;
* that nothing after the last token received is known: writes the primary
  sequenced later never reached this host, not even as tokens.

:func:`build_loss_report` turns :meth:`PendingQueue.loss_view` into a
:class:`LossReport`; ``to_json`` is for machines, ``to_text`` for people.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from replicator.secondary.pending import LossView
from replicator.records import OP_FLUSH, OP_MARK, OP_NAMES

REPORT_FORMAT = 2  # 2: a run of seqs never announced is one entry with a count
#: ``volume_name`` of a lost FLUSH in a report of several volumes: it covers all.
ALL_VOLUMES = "*"


def iso_utc(ts_ns: int | None) -> str | None:
    """*ts_ns* (ns since the epoch) as ISO 8601 UTC with nanoseconds."""
    if ts_ns is None:
        return None
    secs, ns = divmod(ts_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(secs, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns:09d}Z"


@dataclass(frozen=True, slots=True)
class LostWrite:
    """One write after the consistent point. Address fields are None when
    the write was never announced (``announced`` False); such an entry
    stands for ``count`` consecutive seqs from ``seq`` on."""

    seq: int
    volume: int | None
    offset: int | None
    length: int | None
    op: str | None
    ts_ns: int | None
    data_arrived: bool
    announced: bool
    count: int = 1
    volume_name: str | None = None  # several volumes: the name of ``volume``


@dataclass(frozen=True)
class LossReport:
    """The recovery report: consistent through A, and what was lost."""

    consistent_through_seq: int
    consistent_through_ts_ns: int | None
    lost: list[LostWrite]
    last_known_seq: int
    note: str
    resource: str | None = None
    created_ns: int | None = None
    format: int = field(default=REPORT_FORMAT)
    volumes: tuple[str, ...] | None = None  # several volumes: their names by index
    # A consistency group member (DESIGN §13): {"name", "mode", "point_ns",
    # "checkpoint"}: the image is at the group's point, the same on every member.
    group: dict | None = None
    # A planned switchover (DESIGN §7): {"seq", "primary"}: the primary
    # stopped cleanly after this seq, so nothing was written after it.
    clean_stop: dict | None = None

    def with_clean_stop(self, seq: int, primary: str) -> "LossReport":
        """This report, known complete: the primary stopped cleanly at *seq*."""
        from dataclasses import replace
        return replace(self, clean_stop={"seq": seq, "primary": primary},
                       note=(f"The primary {primary} stopped cleanly after seq {seq} (a "
                             f"planned switchover): it wrote nothing after it, so no write "
                             f"is lost."))

    @property
    def lost_count(self) -> int:
        """Writes known lost (a run never announced counts each of its seqs)."""
        return sum(w.count for w in self.lost)

    @property
    def lost_with_data(self) -> list[LostWrite]:
        """Lost writes whose data had arrived (present but not applied)."""
        return [w for w in self.lost if w.data_arrived]

    def to_dict(self) -> dict:
        """The report as plain data (ints, strings, lists), ISO times added."""
        d = {
            "format": self.format,
            "resource": self.resource,
            "created_ns": self.created_ns,
            "created": iso_utc(self.created_ns),
            "consistent_through_seq": self.consistent_through_seq,
            "consistent_through_ts_ns": self.consistent_through_ts_ns,
            "consistent_through_time": iso_utc(self.consistent_through_ts_ns),
            "last_known_seq": self.last_known_seq,
            "note": self.note,
            "lost": [],
        }
        if self.volumes is not None:  # absent for one volume: the format as before
            d["volumes"] = list(self.volumes)
        if self.group is not None:
            d["group"] = dict(self.group, point_time=iso_utc(self.group.get("point_ns")))
        if self.clean_stop is not None:
            d["clean_stop"] = dict(self.clean_stop)
        d["lost_writes"] = self.lost_count
        for w in self.lost:
            e = asdict(w)
            if self.volumes is None:
                del e["volume_name"]
            e["time"] = iso_utc(w.ts_ns)
            d["lost"].append(e)
        return d

    def to_json(self) -> str:
        """The report as JSON (indented, stable key order)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LossReport:
        """Read back a report written by :meth:`to_json`.

        Raises ValueError naming the missing or malformed field.
        """
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, digit limit, nesting
            raise ValueError(f"loss report is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError("loss report is not a JSON object")
        if d.get("format") not in (1, REPORT_FORMAT):  # 1: every seq its own entry
            raise ValueError(f"loss report format {d.get('format')!r} is not 1 or {REPORT_FORMAT}")
        try:
            lost = [LostWrite(e["seq"], e["volume"], e["offset"], e["length"], e["op"],
                              e["ts_ns"], e["data_arrived"], e["announced"], e.get("count", 1),
                              e.get("volume_name"))
                    for e in d["lost"]]
            vols = d.get("volumes")
            group = d.get("group")
            if group is not None and not isinstance(group, dict):
                raise TypeError("group")
            clean = d.get("clean_stop")
            if clean is not None and not isinstance(clean, dict):
                raise TypeError("clean_stop")
            return cls(d["consistent_through_seq"], d["consistent_through_ts_ns"], lost,
                       d["last_known_seq"], d["note"], d.get("resource"), d.get("created_ns"),
                       volumes=tuple(str(v) for v in vols) if vols is not None else None,
                       group=group, clean_stop=clean)
        except (KeyError, TypeError) as e:
            raise ValueError(f"loss report lacks or mangles field {e}") from None

    def to_text(self) -> str:
        """The report for people: one line per lost write, UTC times.

        Consecutive seqs that were never announced share one line, since
        nothing distinguishes them.
        """
        a = self.consistent_through_seq
        lines = []
        title = "Duplex loss report"
        if self.resource:
            title += f" for resource {self.resource}"
        if self.created_ns is not None:
            title += f", written {iso_utc(self.created_ns)}"
        if self.volumes is not None:
            title += f" (volumes {', '.join(self.volumes)})"
        lines.append(title)
        if self.group is not None:
            g = self.group
            if g.get("resigned"):
                lines.append(f"Group {g.get('name')} ({g.get('mode')}): NOT at the group's "
                             f"point: this member had left the group ({g['resigned']}).")
            else:
                lines.append(f"Group {g.get('name')} ({g.get('mode')}): at the group's point "
                             f"{iso_utc(g.get('point_ns'))} (release {g.get('checkpoint')}), "
                             f"the same point on every member; writes stamped later are lost "
                             f"here.")
            if g.get("confirmed") is False and not g.get("resigned"):
                lines.append("  (the rendezvous master could not be asked whether every member "
                             "finished the last release: compare `duplex status "
                             f"{g.get('name')}` on the other secondary hosts)")
        when = iso_utc(self.consistent_through_ts_ns)
        lines.append(f"Consistent through seq {a}"
                     + (f" (written on the primary at {when})" if when else " (time unknown)")
                     + f": the image holds every write up to and including seq {a}"
                     " and none after it.")
        if self.clean_stop is not None:
            lines.append(f"Lost writes: 0. The primary {self.clean_stop.get('primary')} "
                         f"stopped cleanly at seq {self.clean_stop.get('seq')} (planned "
                         f"switchover): this image holds every write it made.")
        elif not self.lost:
            lines.append("No write after that point is known to be lost.")
        else:
            n_data = len(self.lost_with_data)
            lines.append(f"Writes known lost after seq {a}: {self.lost_count} "
                         f"({n_data} with data received but not applied):")
            width = len(str(self.last_known_seq))
            i = 0
            while i < len(self.lost):
                w = self.lost[i]
                if not w.announced:
                    # Consecutive runs (format 1 had one entry per seq) share a line.
                    j = i
                    while (j + 1 < len(self.lost) and not self.lost[j + 1].announced
                           and self.lost[j + 1].seq == self.lost[j].seq + self.lost[j].count):
                        j += 1
                    end = self.lost[j].seq + self.lost[j].count - 1
                    seqs = f"{w.seq}" if end == w.seq else f"{w.seq}-{end}"
                    lines.append(f"  seq {seqs:>{width}}  never announced: address unknown")
                    i = j + 1
                    continue
                # A trim or zero carries no data: its record is what arrives.
                what = "data" if w.op == "write" else "record"
                state = (f"{what} received, not applied" if w.data_arrived
                         else f"{what} not received")
                vol = w.volume if w.volume_name is None else w.volume_name
                lines.append(f"  seq {w.seq:>{width}}  vol {vol}  {w.op:<5}  "
                             f"offset {w.offset}  length {w.length}  "
                             f"{iso_utc(w.ts_ns)}  {state}")
                i += 1
        lines.append(self.note)
        return "\n".join(lines) + "\n"


def build_loss_report(view: LossView, resource: str | None = None,
                      created_ns: int | None = None,
                      volume_names: list[str] | None = None,
                      group: dict | None = None) -> LossReport:
    """The loss report for the state *view* describes (see module doc).
    *volume_names*: the resource's volumes by index, when it has several
    (each lost write then names its volume)."""
    lost = []
    for e in view.entries:
        t = e.token
        if t is not None and t.op == OP_MARK:
            continue  # a group point marker, not a write
        if t is None:
            lost.append(LostWrite(e.seq, None, None, None, None, None, False, False, e.count))
        else:
            name = None
            if volume_names is not None and t.op == OP_FLUSH:
                name = ALL_VOLUMES  # a flush covers every volume
            elif volume_names is not None:
                name = volume_names[t.volume] if t.volume < len(volume_names) else None
            lost.append(LostWrite(e.seq, t.volume, t.offset, t.length,
                                  OP_NAMES.get(t.op, f"op{t.op}"), t.ts_ns,
                                  e.data_arrived, True, volume_name=name))
    ts = view.applied_token.ts_ns if view.applied_token is not None else None
    note = (f"Nothing after seq {view.last_token_seq} is known: writes the primary "
            f"sequenced later never reached this host, not even as tokens.")
    return LossReport(view.applied_through, ts, lost, view.last_token_seq, note,
                      resource, created_ns,
                      volumes=tuple(volume_names) if volume_names is not None else None,
                      group=group)
