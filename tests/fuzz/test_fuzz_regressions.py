"""Every crash the fuzzer found, kept: the exact input bytes (in
tests/fuzz/regressions/, named TARGET-DIGEST) replayed through their target,
and for each bug a test that builds its input from the code and names the
behaviour now expected.

A crash in a file this suite may not fix yet is marked xfail(strict=True):
it fails the day the bug is fixed, so the mark comes off with the fix.
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from fuzz import targets as t
from replicator.config import ConfigError, parse_config
from replicator.records import OP_WRITE, encode_record, iter_records
from replicator.secondary import journal as jn

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
# Inputs of bugs not fixed yet: file name -> why
KNOWN_OPEN: dict[str, str] = {}  # fixed: config-nul-in-volume-device, config-nul-in-meta-dir


def _inputs() -> list[Path]:
    return sorted(p for p in REGRESSIONS.iterdir() if p.is_file())


def _param(p: Path):
    marks = ()
    if p.name in KNOWN_OPEN:
        marks = (pytest.mark.xfail(strict=True, reason=KNOWN_OPEN[p.name]),)
    return pytest.param(p, id=p.name, marks=marks)


@pytest.mark.parametrize("path", [_param(p) for p in _inputs()])
def test_recorded_crash_input_keeps_the_contract(path: Path):
    target = t.TARGETS[path.name.split("-", 1)[0]]
    crash = t.check(target, path.read_bytes())
    assert crash is None, crash.traceback


def test_every_target_named_by_a_recorded_input_exists():
    names = {p.name.split("-", 1)[0] for p in _inputs()}
    assert names <= set(t.TARGETS), names - set(t.TARGETS)


# -- the journal --------------------------------------------------------------

def _journal_with_tokens(tmp_path: Path, tokens: bytes) -> Path:
    """A journal whose one live entry is a TOKENS entry of *tokens* with a
    valid entry crc (what a buggy or hostile writer leaves: not torn)."""
    path = tmp_path / "journal"
    with jn.Journal.create(path, t.RESOURCE_UUID, 16384) as j:
        j.append_token_frame(tokens, 5)
        j.commit()
    return path


@pytest.mark.parametrize("at,value,why", [
    (48 + 36, 0, r"unknown op 0"),                         # the second token's op
    (48 + 44, 1, r"reserved field is not zero"),           # its last reserved u32
    (48 + 24, 7, r"write of 519 bytes carries 525 data bytes"),  # its length
], ids=["op", "reserved", "length"])
def test_journal_tokens_entry_with_a_bad_token_is_refused_at_open(
        tmp_path: Path, at: int, value: int, why: str):
    """Found by the fuzzer (regressions/journal-f27b75b26673bc77, -ad525d03b4a36493,
    -75e5476d4b917f3e): open succeeded and replay() raised RecordError."""
    tokens = bytearray(t._tokens_payload(t._records_payload(2, first_seq=5)))
    tokens[at] = value
    path = _journal_with_tokens(tmp_path, bytes(tokens))
    with pytest.raises(jn.JournalError, match=r"entry lsn 1 at offset 8192 \(tokens\) "
                                              r"is malformed: record seq 6: " + why):
        jn.Journal.open(path, t.RESOURCE_UUID)


def test_journal_records_entry_of_format_1_with_a_bad_record_is_refused_at_open(tmp_path: Path):
    """A version-1 entry (crc over the payload, no records flag) whose
    records do not parse: refused at open, not a RecordError in replay."""
    path = tmp_path / "journal"
    rec = bytearray(encode_record(3, 1, 0, 8, OP_WRITE, b"x" * 8))
    rec[16 + 8 + 4] = 9  # data_len 9 for a write of length 8
    with jn.Journal.create(path, t.RESOURCE_UUID, 16384) as j:
        j._append_entry(jn.ENTRY_RECORDS, memoryview(bytes(rec)), 3)  # no RECORDS_CRC flag
        j.commit()
    with pytest.raises(jn.JournalError, match=r"\(records\) is malformed: record seq 3: "
                                              r"write of 8 bytes carries 9 data bytes"):
        jn.Journal.open(path, t.RESOURCE_UUID)


@pytest.mark.parametrize("etype,payload,why", [
    (jn.ENTRY_INCR_COMMIT, b"\0" * 8, "8 bytes, expected 16"),
    (jn.ENTRY_INCR_ZERO, b"\0" * 16, "16 bytes, expected 24"),
    (jn.ENTRY_INCR_DATA, struct.pack("<QQII", 1, 0, 100, 0) + b"d" * 8,
     "its head says 100 data bytes, it holds 8"),
], ids=["commit", "zero", "data"])
def test_journal_increment_entry_of_the_wrong_size_is_refused_at_open(
        tmp_path: Path, etype: int, payload: bytes, why: str):
    path = tmp_path / "journal"
    with jn.Journal.create(path, t.RESOURCE_UUID, 16384) as j:
        j._append_entry(etype, payload, 0)
        j.commit()
    with pytest.raises(jn.JournalError, match=f"is malformed: {why}"):
        jn.Journal.open(path, t.RESOURCE_UUID)


def test_journal_committed_record_survives_reopen_when_the_first_entry_wrapped(tmp_path: Path):
    """The checkpoint points at offset P, the live log's first entry lies at
    the start of the area (wrapped there): the scan counted the gap after P
    as used, so a record appended and committed behind that entry was taken
    for the end of the log at the next open and lost (found by the fuzzer:
    regressions/journal-8abfc938d4f7ef65)."""
    path = tmp_path / "journal"
    size = 16384
    with jn.Journal.create(path, t.RESOURCE_UUID, size) as j:
        j.append(encode_record(1, 1, 0, 700, OP_WRITE, b"a" * 700))  # at 8192
        j.commit()
        j.checkpoint(1)  # empty live log, head at 8192 + 788: a gap of 7404 to the end
        head = j._head
        # the next entry did not fit at the head: the writer put it at the start
        j._head = jn.AREA_START
        j.append(encode_record(2, 2, 0, 700, OP_WRITE, b"b" * 700))
        j.commit()
        j._write_superblock()
    # the superblock's tail still says the head; make it say so durably
    raw = bytearray(path.read_bytes())
    for off in jn.SB_OFFSETS:
        f = list(jn._SB.unpack_from(raw, off))
        f[7] = head
        body = jn._SB.pack(*f)
        raw[off:off + len(body)] = body
        struct.pack_into("<I", raw, off + jn._SB.size, t.crc32c(body))
    path.write_bytes(bytes(raw))
    with jn.Journal.open(path, t.RESOURCE_UUID) as j:
        assert [tok.seq for tok, _ in j.replay()] == [2]
        j.append(encode_record(3, 3, 0, 512, OP_WRITE, b"c" * 512))
        j.commit()
    with jn.Journal.open(path, t.RESOURCE_UUID) as j:
        assert [tok.seq for tok, _ in j.replay()] == [2, 3], "the committed seq 3 was lost"


@pytest.mark.parametrize("size", [jn.AREA_START, jn.AREA_START + 100, 16384 + 8])
def test_journal_superblock_size_create_never_makes_is_refused(tmp_path: Path, size: int):
    """A superblock (checksum valid) giving a size create() refuses: a log
    area of 0 or 100 bytes took no entry, and the receiver waited for room
    for good."""
    path = tmp_path / "journal"
    jn.Journal.create(path, t.RESOURCE_UUID, 20480).close()
    raw = bytearray(path.read_bytes())
    for off in jn.SB_OFFSETS:
        f = list(jn._SB.unpack_from(raw, off))
        f[4], f[7] = size, jn.AREA_START
        body = jn._SB.pack(*f)
        raw[off:off + len(body)] = body
        struct.pack_into("<I", raw, off + jn._SB.size, t.crc32c(body))
    path.write_bytes(bytes(raw))
    with pytest.raises(jn.JournalError, match=f"superblock gives a size of {size} bytes"):
        jn.Journal.open(path, t.RESOURCE_UUID)


# -- the bitmap files, opened together ---------------------------------------------

def test_activity_log_extent_not_a_track_multiple_is_a_bitmap_files_error():
    """An activity log whose extent size is no multiple of the bitmap's
    track size, met after an unclean stop: BitmapFilesError (a DuplexError:
    one line at the CLI), and neither file is left open."""
    md, bitmap, _, actlog = t._oos_files()
    bad = bytearray(actlog)
    struct.pack_into("<Q", bad, 32, 4 * t.TRACK + 256)
    bad = t.fix_actlog(bytes(bad))
    md.paths.bitmap.write_bytes(bitmap)
    md.paths.activity_log.write_bytes(bad)
    with pytest.raises(t.BitmapFilesError, match=r"activity.log: extent size 16640 is not a "
                                                 r"multiple of the bitmap's track size 4096"):
        t.open_bitmaps(md, None)
    # not left open: both reopen (each takes an exclusive lock)
    t.Bitmap.open(str(md.paths.bitmap), t.NODE_UUID, t.TRACK).abandon()
    t.ActivityLog.open(str(md.paths.activity_log), t.NODE_UUID).close()


def test_records_of_the_seed_journal_are_real():
    """The journal seeds hold what the secondary writes (records, tokens,
    increments), so the fuzzer starts from real entries."""
    path = Path(t.scratch_dir()) / "seed-check"
    seeds = t._seed_journal()
    path.write_bytes(seeds[1][1:])
    with jn.Journal.open(path, t.RESOURCE_UUID) as j:
        kinds = {e.type for e in j._live}
        assert kinds == {jn.ENTRY_RECORDS, jn.ENTRY_TOKENS, jn.ENTRY_INCR_DATA,
                         jn.ENTRY_INCR_ZERO, jn.ENTRY_INCR_COMMIT}
        assert len(j.committed_increments()) == 1
    assert [tok.seq for tok, _ in iter_records(t._records_payload(3))] == [1, 2, 3]


# -- metadata -------------------------------------------------------------------

@pytest.mark.parametrize("content,why", [
    (b"[" * 2000, "arrays or objects nested too deeply"),
    (b'{"body": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "arrays or objects nested too deeply"),
    (b'{"magic": "duplex-metadata", "seq_hwm": 1' + b"0" * 4400 + b"}",
     "a number of more than 4300 digits"),
], ids=["array", "in-body", "digits"])
def test_metadata_json_python_will_not_parse_is_a_metadata_error(content: bytes, why: str):
    """Before: RecursionError / ValueError (int digit limit) tracebacks
    out of json.loads, past the MetadataError the CLI prints as one line."""
    with pytest.raises(t.MetadataError, match=f"metadata.json: damaged metadata \\({why}"):
        t.decode_metadata(content, Path("/var/lib/duplex/r0/metadata.json"))


# -- the config loader (fixed: a NUL in any string value is a ConfigError) -----

def test_config_nul_byte_in_a_volume_device_is_a_config_error():
    text = t._seed_config()[2].decode().replace('device = "/dev/sdb"', 'device = "/dev/s\\u0000db"')
    with pytest.raises(ConfigError, match=r"resource\.r0\.on\.alpha\.volume\.data\.device"):
        parse_config(text)  # today: ValueError: embedded null byte, from os.path.realpath


@pytest.mark.parametrize("key,value", [
    ("meta-dir", "/var/lib/d\\u0000uplex/r0"),
    ("device", "/dev/s\\u0000db"),
    ("secret-file", "/etc/duplex/r0\\u0000.secret"),
])
def test_config_nul_byte_in_a_path_is_a_config_error(key: str, value: str):
    lines = t._seed_config()[0].decode().splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(f"{key} = "))
    lines[i] = f'{key} = "{value}"'
    with pytest.raises(ConfigError, match=key):
        parse_config("\n".join(lines))  # today: accepted
