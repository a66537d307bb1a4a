"""metrics-address in a node's table: off by default, an address otherwise,
a clear error naming the key for a bad one."""
from __future__ import annotations

import pytest

from replicator.config import ConfigError, parse_config
from fixtures.configs import two_node_config


def _config(extra: str = "") -> str:
    return two_node_config(alpha=extra)


def test_off_by_default_and_an_address_when_given():
    cfg = parse_config(_config())
    assert cfg.resource("r0").node("alpha").metrics_address is None
    cfg = parse_config(_config('metrics-address = "127.0.0.1:9942"'))
    assert cfg.resource("r0").node("alpha").metrics_address == ("127.0.0.1", 9942)


@pytest.mark.parametrize("value", ['"127.0.0.1"', '"here:99999"', "9942"])
def test_a_bad_metrics_address_names_the_key(value):
    with pytest.raises(ConfigError, match=r"resource\.r0\.on\.alpha\.metrics-address"):
        parse_config(_config(f"metrics-address = {value}"), "/etc/duplex/duplex.toml")
