"""protocol, on-disconnect, on-congestion, congestion-fill,
congestion-timeout and max-lag in a resource table: the defaults keep
today's behaviour (A, pull-ahead), B and C block by default, and every
mistake names its key."""
from __future__ import annotations

import pytest

from replicator.config import ConfigError, parse_config
from replicator.modes import Modes
from fixtures.configs import two_node_config


def _config(extra: str = "") -> str:
    return two_node_config('ring-size = "16MiB"\n' + extra)


def _modes(extra: str) -> Modes:
    return parse_config(_config(extra)).resource("r0").modes


def test_the_defaults_are_protocol_a_pulling_ahead_at_the_ring_size():
    m = _modes("")
    assert (m.protocol, m.on_disconnect, m.on_congestion) == ("A", "degrade", "pull-ahead")
    assert m.congestion_fill == 16 << 20 and m.congestion_timeout_s == 10.0
    assert m.max_lag_s is None and m.waits_for is None


@pytest.mark.parametrize("protocol, waits", [("B", "received"), ("C", "journaled")])
def test_b_and_c_wait_for_the_peer_and_block_by_default(protocol, waits):
    m = _modes(f'protocol = "{protocol}"')
    assert m.waits_for == waits and m.on_congestion == "block"


def test_every_key_is_read():
    m = _modes('protocol = "C"\non-disconnect = "suspend"\ncongestion-fill = "4MiB"\n'
               'congestion-timeout = "2s"\nmax-lag = "100ms"')
    assert m == Modes("C", "suspend", "block", 4 << 20, 2.0, 0.1)
    assert _modes('on-congestion = "block"').on_congestion == "block"


@pytest.mark.parametrize("extra, key, words", [
    ('protocol = "D"', "protocol", "not one of A, B, C"),
    ('protocol = "c"', "protocol", "not one of A, B, C"),
    ("protocol = 3", "protocol", ""),
    ('on-disconnect = "wait"', "on-disconnect", "not one of degrade, suspend"),
    ('on-congestion = "drop"', "on-congestion", "not one of pull-ahead, block"),
    ('protocol = "C"\non-congestion = "pull-ahead"', "on-congestion", "needs protocol A"),
    ('congestion-fill = "32MiB"', "congestion-fill", "between 1MiB and ring-size"),
    ('congestion-fill = "64KiB"', "congestion-fill", "between 1MiB and ring-size"),
    ('congestion-fill = "lots"', "congestion-fill", ""),
    ('congestion-timeout = "1ms"', "congestion-timeout", "between 10ms and 1h"),
    ('congestion-timeout = "soon"', "congestion-timeout", ""),
    ('max-lag = "1ms"', "max-lag", "between 5ms and 10min"),
    ('max-lag = "forever"', "max-lag", ""),
])
def test_a_mistake_names_its_key(extra, key, words):
    with pytest.raises(ConfigError, match=rf"resource\.r0\.{key}") as e:
        parse_config(_config(extra), "/etc/duplex/duplex.toml")
    assert words in str(e.value)
