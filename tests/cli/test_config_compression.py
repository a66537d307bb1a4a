"""``compression`` and ``compression-level`` in a resource table (DESIGN §9):
read with their defaults, each mistake a ConfigError naming the key."""
from __future__ import annotations

import pytest

from replicator.config import ConfigError, parse_config
from fixtures.configs import two_node_config

P = "/etc/duplex/duplex.toml"


def _config(extra: str = "") -> str:
    return two_node_config(extra)


def test_compression_is_off_by_default():
    r = parse_config(_config(), P).resource("r0")
    assert r.compression == "none" and r.compression_level is None
    assert r.compressor() is None


@pytest.mark.parametrize("extra, codec, level", [
    ('compression = "zstd"', "zstd", 3),
    ('compression = "zstd"\ncompression-level = 19', "zstd", 19),
    ('compression = "lz4"', "lz4", 0),
    ('compression = "lz4"\ncompression-level = 9', "lz4", 9),
])
def test_codec_and_level_are_read(extra, codec, level):
    pytest.importorskip("zstandard")
    pytest.importorskip("lz4.block")
    r = parse_config(_config(extra), P).resource("r0")
    assert r.compression == codec
    c = r.compressor()
    assert c.name == codec and c.level == level


@pytest.mark.parametrize("extra, key, words", [
    ('compression = "gzip"', "compression", "'gzip' is not one of none, zstd, lz4"),
    ("compression = 1", "compression", "must be a string"),
    ('compression = "zstd"\ncompression-level = 25', "compression-level",
     "25 is out of range (1..19)"),
    ('compression = "lz4"\ncompression-level = -1', "compression-level",
     "-1 is out of range (0..16)"),
    ('compression = "zstd"\ncompression-level = "high"', "compression-level",
     "must be an integer"),
    ("compression-level = 3", "compression-level", 'is set but compression is "none"'),
    ('compresion = "zstd"', "compresion", "did you mean 'compression'"),
])
def test_mistakes_name_the_key(extra, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(_config(extra), P)
    msg = str(e.value)
    assert msg.startswith(f"{P}: resource.r0.{key}: "), msg
    assert words in msg
