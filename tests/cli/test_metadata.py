"""Node metadata: round trip, atomic save, and clear refusals of missing,
damaged, foreign or future metadata."""
from __future__ import annotations

import json
import os

import pytest

from replicator.metadata import (MetadataError, MetaPaths, create_metadata, encode_metadata,
                                 load_metadata)


def test_create_then_load_round_trips_every_field(tmp_path):
    md = create_metadata(tmp_path / "meta", "r0", "alpha", 4 << 20, 65536, assume_clean=False)
    loaded = load_metadata(tmp_path / "meta", "r0", "alpha")
    assert loaded == md
    assert (loaded.role, loaded.disk, loaded.needs_initial_sync) == ("Secondary", "Inconsistent", True)
    assert (loaded.device_size, loaded.track_size, loaded.seq_hwm) == (4 << 20, 65536, 0)
    assert len({md.resource_uuid, md.node_uuid, md.generation}) == 3
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in (md.resource_uuid, md.node_uuid, md.generation))
    assert oct(os.stat(tmp_path / "meta").st_mode & 0o777) == "0o700"


def test_assume_clean_means_uptodate_and_no_initial_sync(tmp_path):
    md = create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True)
    assert (md.disk, md.needs_initial_sync) == ("UpToDate", False)


def test_save_persists_changes_and_leaves_no_temp_file(tmp_path):
    md = create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True)
    before = md.updated
    md.seq_hwm = 123456789
    md.role = "Primary"
    md.history.insert(0, md.generation)
    md.generation = "ab" * 16
    md.save()
    loaded = load_metadata(tmp_path, "r0")
    assert (loaded.seq_hwm, loaded.role, loaded.generation) == (123456789, "Primary", "ab" * 16)
    assert loaded.history == [md.history[0]] and loaded.updated >= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]


def test_save_is_atomic_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    md = create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True)
    old = MetaPaths(tmp_path).metadata.read_bytes()

    def crash(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", crash)
    md.seq_hwm = 99
    with pytest.raises(OSError):
        md.save()
    monkeypatch.undo()
    assert MetaPaths(tmp_path).metadata.read_bytes() == old
    assert load_metadata(tmp_path, "r0").seq_hwm == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]


def test_invalid_field_is_refused_at_save(tmp_path):
    md = create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True)
    md.role = "Boss"
    with pytest.raises(MetadataError, match="field 'role' is 'Boss'"):
        md.save()


def test_existing_metadata_is_not_overwritten_without_force(tmp_path):
    first = create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True)
    with pytest.raises(MetadataError) as ei:
        create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True)
    assert str(ei.value) == (f"{tmp_path}/metadata.json: metadata for this node already exists; "
                             f"--force overwrites it and discards its replication state")
    assert load_metadata(tmp_path, "r0").node_uuid == first.node_uuid
    second = create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True, force=True)
    assert load_metadata(tmp_path, "r0").node_uuid == second.node_uuid != first.node_uuid


def test_missing_metadata_says_to_run_create_md(tmp_path):
    with pytest.raises(MetadataError) as ei:
        load_metadata(tmp_path, "r0")
    assert str(ei.value) == f"no metadata in {tmp_path}: run `duplex create-md r0` first"


def test_damaged_metadata_is_refused_by_checksum(tmp_path):
    create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True)
    path = MetaPaths(tmp_path).metadata
    doc = json.loads(path.read_text())
    doc["body"]["seq_hwm"] = 5  # a change that does not update the checksum
    path.write_text(json.dumps(doc))
    with pytest.raises(MetadataError) as ei:
        load_metadata(tmp_path, "r0")
    assert str(ei.value).startswith(f"{path}: damaged metadata: checksum mismatch")


def test_torn_metadata_is_refused(tmp_path):
    create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True)
    path = MetaPaths(tmp_path).metadata
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(MetadataError, match=r"damaged metadata \(not JSON"):
        load_metadata(tmp_path, "r0")


def test_foreign_resource_and_node_are_refused(tmp_path):
    create_metadata(tmp_path, "r1", "alpha", 1 << 20, 4096, assume_clean=True)
    with pytest.raises(MetadataError) as ei:
        load_metadata(tmp_path, "r0")
    assert str(ei.value) == (f"{tmp_path}/metadata.json: belongs to resource 'r1', not 'r0' "
                             f"(two resources sharing a meta-dir?)")
    with pytest.raises(MetadataError, match="belongs to node 'alpha', not 'beta'"):
        load_metadata(tmp_path, "r1", "beta")


def test_unsupported_version_and_bad_magic_are_refused(tmp_path):
    md = create_metadata(tmp_path, "r0", "alpha", 1 << 20, 4096, assume_clean=True)
    path = MetaPaths(tmp_path).metadata
    doc = json.loads(encode_metadata(md.to_body()))
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match="metadata format version 99 is not supported"):
        load_metadata(tmp_path, "r0")
    doc["magic"] = "drbd"
    path.write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match=r"not a Duplex metadata file \(bad magic\)"):
        load_metadata(tmp_path, "r0")


def test_meta_paths_name_every_file_in_the_meta_dir(tmp_path):
    p = MetaPaths(tmp_path)
    files = [p.metadata, p.bitmap, p.activity_log, p.journal, p.control_socket, p.lock,
             p.attach, p.loss_report]
    assert all(f.parent == tmp_path for f in files)
    assert len({f.name for f in files}) == len(files)
