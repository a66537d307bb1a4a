"""The metadata's volume list: laid end to end it makes device_size; files
made before volumes read as one volume; a damaged list is named."""
from __future__ import annotations

import json

import pytest

from replicator.crc32c import crc32c
from replicator.metadata import (DEFAULT_VOLUME, MetadataError, create_metadata, load_metadata,
                                 logical_size)

TS = 64 << 10
VOLS = [{"name": "data", "size": 3 * TS + 4096}, {"name": "wal", "size": 2 * TS}]


def _rewrite(path, mutate) -> None:
    doc = json.loads(path.read_text())
    mutate(doc["body"])
    doc["crc32c"] = crc32c(json.dumps(doc["body"], sort_keys=True, separators=(",", ":")).encode())
    path.write_text(json.dumps(doc))


def test_two_volumes_are_laid_end_to_end_on_track_boundaries(tmp_path):
    size = logical_size(VOLS, TS)
    assert size == 4 * TS + 2 * TS  # data's last track is partial; wal starts on the next one
    md = create_metadata(tmp_path, "r0", "alpha", size, TS, assume_clean=True, volumes=VOLS)
    assert load_metadata(tmp_path, "r0").volumes == VOLS == md.volumes


def test_a_single_device_resource_has_one_default_volume(tmp_path):
    md = create_metadata(tmp_path, "r0", "alpha", 1 << 20, TS, assume_clean=True)
    assert md.volumes == [{"name": DEFAULT_VOLUME, "size": 1 << 20}]


def test_metadata_written_before_volumes_reads_as_one_volume(tmp_path):
    create_metadata(tmp_path, "r0", "alpha", 1 << 20, TS, assume_clean=True)
    _rewrite(tmp_path / "metadata.json", lambda b: b.pop("volumes"))
    assert load_metadata(tmp_path, "r0").volumes == [{"name": DEFAULT_VOLUME, "size": 1 << 20}]


@pytest.mark.parametrize("mutate, words", [
    (lambda b: b.update(volumes=[{"name": "data", "size": 1 << 20}] * 2), "names volume 'data' twice"),
    (lambda b: b.update(volumes=[{"name": "data", "size": 4096}]), "does not match device_size"),
    (lambda b: b.update(volumes=[{"name": "", "size": 1 << 20}]), "entry 0 is not"),
    (lambda b: b.update(volumes=[]), "does not match device_size"),
])
def test_a_damaged_volume_list_is_refused_with_its_fault_named(tmp_path, mutate, words):
    create_metadata(tmp_path, "r0", "alpha", 1 << 20, TS, assume_clean=True)
    _rewrite(tmp_path / "metadata.json", mutate)
    with pytest.raises(MetadataError, match="volumes") as e:
        load_metadata(tmp_path, "r0")
    assert words in str(e.value)


def test_create_refuses_a_device_size_that_is_not_the_volumes_laid_end_to_end(tmp_path):
    with pytest.raises(MetadataError, match="does not match device_size"):
        create_metadata(tmp_path, "r0", "alpha", 1 << 20, TS, assume_clean=True, volumes=VOLS)
