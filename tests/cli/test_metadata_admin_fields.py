"""The metadata fields of the admin's commands (DESIGN §7): invalidated,
outdated, clean_stop_seq. Saved and read back; absent in older files (as
none of the commands had run); a wrong type is refused by name."""
from __future__ import annotations

import json

import pytest

from replicator.metadata import MetadataError, create_metadata, encode_metadata, load_metadata


def test_the_admin_fields_round_trip(tmp_path):
    md = create_metadata(tmp_path, "r0", "beta", 1 << 20, 4096, assume_clean=True)
    assert (md.invalidated, md.outdated, md.clean_stop_seq) == (False, False, None)
    with md.update():
        md.invalidated, md.outdated, md.clean_stop_seq = True, True, 4711
    again = load_metadata(tmp_path, "r0", "beta")
    assert (again.invalidated, again.outdated, again.clean_stop_seq) == (True, True, 4711)


def _rewrite(path, change) -> None:
    doc = json.loads(path.read_text())
    body = doc["body"]
    change(body)
    path.write_bytes(encode_metadata(body))


def test_a_file_from_before_the_admin_commands_loads_with_none_of_them_set(tmp_path):
    md = create_metadata(tmp_path, "r0", "beta", 1 << 20, 4096, assume_clean=True)
    for k in ("invalidated", "outdated", "clean_stop_seq"):
        _rewrite(md.paths.metadata, lambda b: b.pop(k))
    again = load_metadata(tmp_path, "r0", "beta")
    assert (again.invalidated, again.outdated, again.clean_stop_seq) == (False, False, None)


def test_a_wrong_type_is_refused_naming_the_field(tmp_path):
    md = create_metadata(tmp_path, "r0", "beta", 1 << 20, 4096, assume_clean=True)
    _rewrite(md.paths.metadata, lambda b: b.update(clean_stop_seq="12"))
    with pytest.raises(MetadataError, match="clean_stop_seq"):
        load_metadata(tmp_path, "r0", "beta")
