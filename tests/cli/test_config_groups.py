"""Consistency group tables in the configuration (DESIGN §13): members,
endpoints for every node of every member, the mode and its timings, and a
clear error naming the key for each mistake."""
from __future__ import annotations

import textwrap

import pytest

from replicator.config import ConfigError, parse_config

P = "/etc/duplex/duplex.toml"


def _resource(name: str, a: str, b: str, port: int) -> str:
    return textwrap.dedent(f"""\
        [resource.{name}]
        secret-file = "/etc/duplex/{name}.secret"
        [resource.{name}.on.{a}]
        address = "10.0.0.1:{port}"
        device = "/dev/sdb"
        meta-dir = "/var/lib/duplex/{name}"
        [resource.{name}.on.{b}]
        address = "10.0.0.2:{port}"
        device = "/dev/sdb"
        meta-dir = "/var/lib/duplex/{name}"
        """)


def _config(group: str = "", nodes=("alpha", "beta", "gamma", "delta")) -> str:
    text = _resource("r0", "alpha", "beta", 7789) + _resource("r1", "gamma", "delta", 7790)
    if group is None:
        return text
    g = group or textwrap.dedent("""\
        [group.g0]
        resources = ["r0", "r1"]
        secret-file = "/etc/duplex/g0.secret"
        """)
    for i, n in enumerate(nodes):
        g += f'[group.g0.on.{n}]\naddress = "10.0.1.{i + 1}:7799"\n'
    return text + g


def test_a_group_with_defaults():
    cfg = parse_config(_config(), P)
    g = cfg.group("g0")
    assert g.resources == ("r0", "r1") and g.master == "r0"
    assert g.mode == "checkpoint" and g.interval_s == 0.02 and g.max_skew_s == 0.005
    assert g.endpoint("gamma") == ("10.0.1.3", 7799)
    assert cfg.group_of("r1") is g and cfg.group_of("nope") is None


def test_mode_timings_and_master_are_read():
    g = parse_config(_config(textwrap.dedent("""\
        [group.g0]
        resources = ["r0", "r1"]
        secret-file = "/etc/duplex/g0.secret"
        mode = "limit-time"
        checkpoint-interval = "50ms"
        max-clock-skew = "2ms"
        master = "r1"
        """)), P).group("g0")
    assert (g.mode, g.interval_s, g.max_skew_s, g.master) == ("limit-time", 0.05, 0.002, "r1")


def _group(**keys) -> str:
    lines = ["[group.g0]"]
    base = {"resources": '["r0", "r1"]', "secret-file": '"/etc/duplex/g0.secret"'}
    base.update(keys)
    lines += [f"{k} = {v}" for k, v in base.items() if v is not None]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("group, nodes, key, words", [
    (_group(resources='["r0"]'), None, "group.g0.resources", "at least two resources"),
    (_group(resources='["r0", "r9"]'), None, "group.g0.resources", "no resource 'r9'"),
    (_group(resources='["r0", "r0"]'), None, "group.g0.resources", "names a resource twice"),
    (_group(resources='"r0"'), None, "group.g0.resources", "must be a list"),
    (_group(mode='"sync"'), None, "group.g0.mode", "not one of checkpoint, limit-time"),
    (_group(**{"checkpoint-interval": '"0s"'}), None, "group.g0.checkpoint-interval",
     "between 1ms and 10s"),
    (_group(master='"r7"'), None, "group.g0.master", "not one of the group's resources"),
    (_group(colour="1"), None, "group.g0", "colour"),
    (_group(), ("alpha", "beta", "gamma"), "group.g0.on", "node delta has no group endpoint"),
    (_group(), ("alpha", "beta", "gamma", "delta", "omega"), "group.g0.on.omega",
     "not a node of any of the group's resources"),
])
def test_group_errors_name_the_key(group, nodes, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(_config(group, nodes or ("alpha", "beta", "gamma", "delta")), P)
    assert f"{P}: {key}" in str(e.value) and words in str(e.value), str(e.value)


def test_a_resource_in_two_groups_is_refused():
    text = _config() + textwrap.dedent("""\
        [group.g1]
        resources = ["r1", "r0"]
        secret-file = "/etc/duplex/g1.secret"
        [group.g1.on.alpha]
        address = "10.0.1.1:7798"
        """)
    with pytest.raises(ConfigError, match="resource r1 is already in group g0"):
        parse_config(text, P)


def test_a_group_named_like_a_resource_is_refused():
    text = _config().replace("[group.g0", "[group.r1")
    with pytest.raises(ConfigError, match="a resource is called 'r1' too"):
        parse_config(text, P)


def test_a_bad_endpoint_address_names_the_node():
    text = _config().replace('address = "10.0.1.2:7799"', 'address = "nowhere"')
    with pytest.raises(ConfigError, match=r"group\.g0\.on\.beta\.address"):
        parse_config(text, P)
