"""The secondary's journal: durability, replay, torn tails, space, superblocks."""
from __future__ import annotations

import os
import struct
import uuid as uuidlib

import pytest

from _secondary_helpers import fill, rec
from replicator.crc32c import crc32c
from replicator.secondary.journal import (_SB, AREA_START, ENTRY_FLAG_RECORDS_CRC, ENTRY_HEADER_SIZE,
                                ENTRY_RECORDS, FORMAT_VERSION, SB_OFFSETS, Journal, JournalError,
                                JournalFull, entry_size)
from replicator.secondary.pending import PendingQueue
from replicator.records import HEADER_SIZE, RecordError

UUID = uuidlib.UUID("6f1c2a3e-0000-4000-8000-0000000000a1").bytes
OTHER = uuidlib.UUID("6f1c2a3e-0000-4000-8000-0000000000b2").bytes
SIZE = AREA_START + 64 * 1024


@pytest.fixture
def jpath(tmp_path):
    return tmp_path / "r0.journal"


@pytest.fixture
def journal(jpath):
    j = Journal.create(jpath, UUID, SIZE)
    try:
        yield j
    finally:
        j.close()


def frame(*seqs, n=200):
    """A DATA frame payload: the records for *seqs*, and their (token, raw)."""
    recs = [rec(s, s * 512, fill(s, n)) for s in seqs]
    return b"".join(r for _, r in recs), recs


def garble(path, offset, n=16):
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xA5 for b in old))


def test_appended_records_read_back_after_commit(journal):
    payload, recs = frame(1, 2, 3)
    placed = journal.append(payload)
    assert [t for t, _ in placed] == [t for t, _ in recs]
    assert journal.commit() == 1
    for (tok, pos), (_, raw) in zip(placed, recs):
        assert pos.seq == tok.seq and pos.size == len(raw)
        assert journal.read_record(pos) == raw


def test_one_entry_per_frame_and_one_fdatasync_per_commit(journal, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    journal.append(frame(1, 2)[0])
    journal.append(frame(3)[0])
    journal.append(frame(4, 5, 6)[0])
    assert journal.entries == 3
    journal.commit()
    journal.commit()  # nothing new: no second fdatasync
    assert len(calls) == 1


def test_replay_after_close_returns_every_record_and_token_in_log_order(jpath, journal):
    p1, r1 = frame(2, 1)
    placed = journal.append(p1)
    tokens = b"".join(t.pack() for t, _ in frame(3, 4)[1])
    journal.append_tokens(tokens)
    p3, r3 = frame(3)
    placed += journal.append(p3)
    journal.commit()
    journal.close()
    with Journal.open(jpath, UUID) as j:
        got = list(j.replay())
        assert [(t.seq, pos is not None) for t, pos in got] == [
            (2, True), (1, True), (3, False), (4, False), (3, True)]
        assert [pos for _, pos in got if pos is not None] == [p for _, p in placed]
        q = PendingQueue.rebuild(j.applied_seq, got)
        assert [t.seq for t, _ in q.next_run()] == [1, 2, 3]
        assert q.first_gap() == (4, True)
        assert j.read_record(got[1][1]) == r1[1][1]


def _entry_offsets(j: Journal) -> list[int]:
    return [e.pos for e in j._live]


def test_replay_stops_cleanly_at_a_torn_tail(jpath, journal):
    for s in (1, 2, 3):
        journal.append(frame(s)[0])
    journal.commit()
    journal.append(frame(4)[0])  # never committed; the crash tears it
    torn_at = _entry_offsets(journal)[-1]
    journal.close()
    garble(jpath, torn_at + ENTRY_HEADER_SIZE + HEADER_SIZE + 50)
    with Journal.open(jpath, UUID) as j:
        assert [t.seq for t, _ in j.replay()] == [1, 2, 3]
        # Appends continue where the good log ends, over the torn entry.
        placed = j.append(frame(4, 5)[0])
        assert placed[0][1].offset == torn_at + ENTRY_HEADER_SIZE
        j.commit()
    with Journal.open(jpath, UUID) as j:
        assert [t.seq for t, _ in j.replay()] == [1, 2, 3, 4, 5]


def test_zeroed_tail_header_ends_the_replay(jpath, journal):
    for s in (1, 2):
        journal.append(frame(s)[0])
    journal.commit()
    last = _entry_offsets(journal)[-1]
    journal.close()
    with open(jpath, "r+b") as f:
        f.seek(last)
        f.write(bytes(ENTRY_HEADER_SIZE))
    with Journal.open(jpath, UUID) as j:
        assert [t.seq for t, _ in j.replay()] == [1]


def test_stale_entry_behind_a_rewritten_torn_entry_is_not_replayed(jpath, journal):
    for s in (1, 2, 3):
        journal.append(frame(s)[0])
    journal.commit()
    e2 = _entry_offsets(journal)[1]
    journal.close()
    garble(jpath, e2 + ENTRY_HEADER_SIZE + 8)  # entry 2 torn; entry 3 intact behind it
    with Journal.open(jpath, UUID) as j:
        assert [t.seq for t, _ in j.replay()] == [1]
        # Same size as the old entry 2, so the old entry 3 follows it exactly.
        j.append(frame(7)[0])
        j.commit()
    with Journal.open(jpath, UUID) as j:
        # Old entry 3 has the right LSN but chains to the old entry 2.
        assert [t.seq for t, _ in j.replay()] == [1, 7]


def test_log_wraps_around_over_many_checkpoints(jpath):
    size = AREA_START + 16 * 1024
    positions = []
    spanning_reopens = 0
    j = Journal.create(jpath, UUID, size)
    try:
        q = PendingQueue(0)
        seq = last_ckpt = 0
        for i in range(150):
            n = 1 + (i * 7) % 3
            payload, recs = frame(*range(seq + 1, seq + 1 + n), n=300 + (i * 97) % 900)
            seq += n
            placed = j.append(payload)
            j.commit()
            q.add_tokens(t for t, _ in recs)
            for tok, pos in placed:
                q.add_record(tok, pos)
                positions.append(pos.offset)
            run = q.next_run()
            for (tok, pos), (_, raw) in zip(run, recs):
                assert j.read_record(pos) == raw
            q.mark_applied(run[-1][0].seq)
            if i % 3 == 2:
                j.checkpoint(q.applied_through, q.applied_token)
                last_ckpt = q.applied_through
            assert j.used_bytes <= j.area_size
            live = list(j.replay())
            offsets = [p.offset for _, p in live]
            spans = offsets != sorted(offsets)
            if spans or i % 10 == 9:  # restart: the live log is found again
                spanning_reopens += spans
                j.close()
                j = Journal.open(jpath, UUID)
                assert list(j.replay()) == live
                assert [t.seq for t, _ in live] == list(range(last_ckpt + 1, seq + 1))
                assert j.applied_seq == last_ckpt
        assert min(positions) < AREA_START + 1024 and max(positions) > size - 3000
        wraps = sum(1 for a, b in zip(positions, positions[1:]) if b < a)
        assert wraps >= 5, f"the log wrapped only {wraps} times"
        assert spanning_reopens >= 2, "no restart found a live log spanning the wrap point"
    finally:
        j.close()


def test_full_journal_refuses_instead_of_overwriting_unapplied_records(jpath):
    size = AREA_START + 8 * 1024
    with Journal.create(jpath, UUID, size) as j:
        written = []
        seq = 0
        while j.has_room(len(frame(seq + 1, n=900)[0])):
            seq += 1
            payload, recs = frame(seq, n=900)
            j.append(payload)
            written.append(recs[0][1])
        j.commit()
        seq += 1
        with pytest.raises(JournalFull, match="full"):
            j.append(frame(seq, n=900)[0])
        assert [j.read_record(p) for _, p in j.replay()] == written
        assert j.checkpoint(2) == 2 * entry_size(len(written[0]))
        j.append(frame(seq, n=900)[0])  # room again at the start of the area
        j.commit()
    with Journal.open(jpath, UUID) as j:
        assert [t.seq for t, _ in j.replay()] == list(range(3, seq + 1))


def test_entry_holding_an_unapplied_seq_keeps_its_space(journal):
    journal.append(frame(7)[0])  # arrived early; 1..6 come later
    for s in range(1, 7):
        journal.append(frame(s)[0])
    journal.commit()
    used = journal.used_bytes
    assert journal.checkpoint(6) == 0
    assert journal.used_bytes == used
    assert journal.checkpoint(7) == used and journal.used_bytes == 0


def test_checkpoint_survives_reopen_with_its_token(jpath, journal):
    payload, recs = frame(1, 2)
    journal.append(payload)
    journal.commit()
    journal.checkpoint(2, recs[1][0])
    journal.close()
    with Journal.open(jpath, UUID) as j:
        assert j.applied_seq == 2 and j.applied_token == recs[1][0]
        assert list(j.replay()) == []
        assert j.used_bytes == 0


def _sb_gen(path, slot):
    with open(path, "rb") as f:
        f.seek(SB_OFFSETS[slot] + 40)
        return struct.unpack("<Q", f.read(8))[0]


def test_damaged_newest_superblock_falls_back_to_the_other(jpath, journal):
    journal.append(frame(1)[0])
    journal.commit()
    journal.checkpoint(1)
    journal.close()
    newest = 0 if _sb_gen(jpath, 0) > _sb_gen(jpath, 1) else 1
    garble(jpath, SB_OFFSETS[newest] + 60)
    with Journal.open(jpath, UUID) as j:
        # The older checkpoint: seq 1 is replayed again (re-applying is exact).
        assert j.applied_seq == 0
        assert [t.seq for t, _ in j.replay()] == [1]


def test_damaged_older_superblock_is_ignored(jpath, journal):
    journal.append(frame(1)[0])
    journal.commit()
    journal.checkpoint(1)
    journal.close()
    older = 1 if _sb_gen(jpath, 0) > _sb_gen(jpath, 1) else 0
    garble(jpath, SB_OFFSETS[older] + 60)
    with Journal.open(jpath, UUID) as j:
        assert j.applied_seq == 1 and list(j.replay()) == []


def test_both_superblocks_damaged_is_a_clear_error(jpath, journal):
    journal.close()
    garble(jpath, SB_OFFSETS[0] + 60)
    garble(jpath, SB_OFFSETS[1] + 60)
    with pytest.raises(JournalError, match=f"journal {jpath}: both superblocks are damaged"):
        Journal.open(jpath, UUID)


def test_journal_of_another_resource_is_refused(jpath, journal):
    journal.close()
    with pytest.raises(JournalError, match=f"belongs to resource {uuidlib.UUID(bytes=UUID)}"):
        Journal.open(jpath, OTHER)


def test_journal_of_another_format_version_is_refused(jpath, journal):
    journal.close()
    with open(jpath, "r+b") as f:
        for off in SB_OFFSETS:
            f.seek(off + 8)
            f.write(struct.pack("<I", FORMAT_VERSION + 1))
    with pytest.raises(JournalError, match=f"format version {FORMAT_VERSION + 1}; this Duplex "
                                           f"reads version {FORMAT_VERSION}"):
        Journal.open(jpath, UUID)


def test_truncated_journal_is_refused(jpath, journal):
    journal.close()
    os.truncate(jpath, SIZE - 4096)
    with pytest.raises(JournalError, match=f"truncated: the file is {SIZE - 4096} bytes"):
        Journal.open(jpath, UUID)
    os.truncate(jpath, 5000)
    with pytest.raises(JournalError, match="too short .5000 bytes"):
        Journal.open(jpath, UUID)


def test_file_that_is_not_a_journal_is_refused(tmp_path):
    p = tmp_path / "image"
    p.write_bytes(os.urandom(SIZE))
    with pytest.raises(JournalError, match="not a Duplex journal"):
        Journal.open(p, UUID)
    with pytest.raises(JournalError, match="no such file"):
        Journal.open(tmp_path / "missing", UUID)


def test_create_refuses_an_existing_file_and_bad_sizes(jpath, journal):
    with pytest.raises(JournalError, match="already exists"):
        Journal.create(jpath, UUID, SIZE)
    with pytest.raises(JournalError, match="multiple of 4096"):
        Journal.create(jpath.with_name("x"), UUID, SIZE + 100)


def test_create_preallocates_the_whole_file(jpath, journal):
    st = os.stat(jpath)
    assert st.st_size == SIZE and st.st_blocks * 512 >= SIZE


def test_second_opener_is_refused_while_in_use(jpath, journal):
    journal.append(frame(1)[0])
    journal.commit()
    with pytest.raises(JournalError, match="in use by another process"):
        Journal.open(jpath, UUID)
    with pytest.raises(JournalError, match="in use by another process"):
        Journal.create(jpath, UUID, SIZE, overwrite=True)
    assert [t.seq for t, _ in journal.replay()] == [1]


def test_create_with_overwrite_starts_an_empty_journal(jpath, journal):
    journal.append(frame(1)[0])
    journal.commit()
    journal.close()
    with Journal.create(jpath, UUID, SIZE, overwrite=True) as j:
        assert list(j.replay()) == [] and j.applied_seq == 0
    with Journal.open(jpath, UUID) as j:
        assert list(j.replay()) == []


def test_damaged_record_is_never_returned(jpath, journal):
    (tok, pos), = journal.append(frame(1)[0])
    journal.commit()
    garble(jpath, pos.offset + HEADER_SIZE + 10, 4)
    with pytest.raises(JournalError, match=f"record seq 1 at offset {pos.offset} is damaged: "
                                           "CRC mismatch"):
        journal.read_record(pos)


def test_entry_larger_than_the_log_can_never_be_appended(journal):
    with pytest.raises(ValueError, match="can never fit"):
        journal.append(frame(1, n=70 * 1024)[0])


# -- format 2: RECORDS entries checked by their records' own CRCs -------------

def _entry_header(path, at):
    with open(path, "rb") as f:
        f.seek(at)
        return struct.unpack("<IHHQIIQII", f.read(ENTRY_HEADER_SIZE))


def test_records_entries_are_flagged_and_their_crc_covers_the_header(jpath, journal):
    journal.append(frame(1, 2)[0])
    journal.append_frame(frame(3)[0], 3)
    journal.append_tokens(b"".join(t.pack() for t, _ in frame(4)[1]))
    journal.commit()
    flags = [_entry_header(jpath, at)[2] for at in _entry_offsets(journal)]
    assert flags == [ENTRY_FLAG_RECORDS_CRC, ENTRY_FLAG_RECORDS_CRC, 0]
    for at in _entry_offsets(journal)[:2]:
        head = bytearray(_header_bytes(jpath, at))
        crc = struct.unpack_from("<I", head, 32)[0]
        head[32:36] = bytes(4)
        assert crc == crc32c(bytes(head))


def _header_bytes(path, at):
    with open(path, "rb") as f:
        f.seek(at)
        return f.read(ENTRY_HEADER_SIZE)


@pytest.mark.parametrize("where", ["data", "padding", "record header"])
def test_a_damaged_record_ends_the_log_like_a_torn_entry(jpath, journal, where):
    # The entry's CRC no longer covers the payload: the records' CRCs (and
    # zero padding) must catch the damage when the journal is opened.
    for s in (1, 2):
        journal.append(frame(s)[0])
    journal.append(frame(3, n=201)[0])  # 201 data bytes: 7 of padding
    journal.commit()
    last = _entry_offsets(journal)[-1] + ENTRY_HEADER_SIZE
    journal.close()
    at = {"data": last + HEADER_SIZE + 100, "padding": last + HEADER_SIZE + 203,
          "record header": last + 16}[where]
    garble(jpath, at, 1)
    with Journal.open(jpath, UUID) as j:
        assert [t.seq for t, _ in j.replay()] == [1, 2]


def test_append_refuses_records_that_fail_their_crc(journal):
    payload = bytearray(frame(1, 2)[0])
    payload[HEADER_SIZE + 7] ^= 1
    with pytest.raises(RecordError, match="record seq 1: CRC mismatch"):
        journal.append(bytes(payload))
    assert journal.entries == 0


def test_entry_with_unknown_flags_is_an_error_not_a_torn_tail(jpath, journal):
    journal.append(frame(1)[0])
    journal.commit()
    at = _entry_offsets(journal)[-1]
    journal.close()
    head = bytearray(_header_bytes(jpath, at))
    head[6] = 0x03  # RECORDS_CRC and an unknown bit, with a valid CRC
    head[32:36] = bytes(4)
    head[32:36] = struct.pack("<I", crc32c(bytes(head)))
    with open(jpath, "r+b") as f:
        f.seek(at)
        f.write(head)
    with pytest.raises(JournalError, match=r"entry lsn \d+ at offset \d+ has unknown type 1 or "
                                           r"flags 0x0003 \(written by a newer version\?\)"):
        Journal.open(jpath, UUID)


def _set_superblock_version(path, version):
    with open(path, "r+b") as f:
        for off in SB_OFFSETS:
            f.seek(off)
            raw = bytearray(f.read(_SB.size + 4))
            struct.pack_into("<I", raw, 8, version)
            struct.pack_into("<I", raw, _SB.size, crc32c(bytes(raw[:_SB.size])))
            f.seek(off)
            f.write(raw)


def _superblock_versions(path):
    with open(path, "rb") as f:
        out = []
        for off in SB_OFFSETS:
            f.seek(off)
            out.append(struct.unpack_from("<I", f.read(12), 8)[0])
        return out


def test_a_version_1_journal_replays_and_is_upgraded_on_open(jpath, journal):
    # Version 1: every entry's CRC covers its payload, no flags.
    recs = []
    for s in (1, 2, 3):
        payload, r = frame(s)
        journal._append_entry(ENTRY_RECORDS, memoryview(payload), s)
        recs += r
    journal.commit()
    journal.close()
    _set_superblock_version(jpath, 1)
    with Journal.open(jpath, UUID) as j:
        got = list(j.replay())
        assert [t.seq for t, _ in got] == [1, 2, 3]
        assert [j.read_record(p) for _, p in got] == [raw for _, raw in recs]
        j.append(frame(4)[0])
        j.commit()
    # Both slots say 2 now: an older Duplex refuses the journal instead of
    # taking the flagged entry for a torn tail.
    assert _superblock_versions(jpath) == [2, 2]
    with Journal.open(jpath, UUID) as j:
        assert [t.seq for t, _ in j.replay()] == [1, 2, 3, 4]


def test_a_damaged_payload_in_a_version_1_entry_still_ends_the_log(jpath, journal):
    for s in (1, 2):
        journal._append_entry(ENTRY_RECORDS, memoryview(frame(s)[0]), s)
    journal.commit()
    last = _entry_offsets(journal)[-1]
    journal.close()
    _set_superblock_version(jpath, 1)
    garble(jpath, last + ENTRY_HEADER_SIZE + HEADER_SIZE + 100, 1)
    with Journal.open(jpath, UUID) as j:
        assert [t.seq for t, _ in j.replay()] == [1]
