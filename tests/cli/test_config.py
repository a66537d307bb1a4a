"""The configuration file: the valid schema, and a clear error (file, key
path, what is wrong) for every kind of mistake."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from replicator.config import (ConfigError, Export, load_config, parse_address,
                               parse_config, select_node)

P = "/etc/duplex/duplex.toml"


def test_valid_file_loads_every_field_with_units_converted(config_file: Path, setup_dir: Path):
    cfg = load_config(config_file)
    assert cfg.path == str(config_file)
    r = cfg.resource("r0")
    assert (r.track_size, r.ring_size, r.journal_size) == (64 << 10, 64 << 20, 16 << 20)
    # defaults for keys the file leaves out
    assert (r.al_extent_size, r.al_extents, r.batch_bytes) == (4 << 20, 1024, 1 << 20)
    assert r.batch_interval_s == pytest.approx(0.002)
    assert (r.connections, r.resync_rate, r.fence_command) == (1, 0, None)
    alpha, beta = r.node("alpha"), r.node("beta")
    assert alpha.address == ("10.0.0.1", 7789)
    assert alpha.device == f"{setup_dir}/alpha.img"
    assert alpha.export == Export("unix", path=f"{setup_dir}/r0.nbd")
    assert alpha.export_uri() == f"nbd+unix:///?socket={setup_dir}/r0.nbd"
    # beta has no export: the default under /run/duplex
    assert beta.export_uri() == "nbd+unix:///?socket=/run/duplex/r0.nbd"
    assert r.peer_of("alpha") is beta and r.peer_of("beta") is alpha
    assert r.secret() == b"s3cret-value"


def test_optional_keys_are_parsed(setup_dir: Path, config_text):
    text = config_text(
        setup_dir,
        extra_resource='batch-interval = "1.5s"\nconnections = 4\nresync-rate = "100MiB/s"\n'
                       'fence-command = "/usr/local/bin/fence beta"\nal-extent-size = "1MiB"\n'
                       'drain-timeout = "30s"',
        extra_alpha='service-address = "10.0.0.10/24"\nservice-interface = "eth0"\n'
                    'mount-point = "/srv/data"')
    r = parse_config(text).resource("r0")
    assert r.batch_interval_s == 1.5 and r.connections == 4 and r.drain_timeout_s == 30
    assert r.resync_rate == 100 << 20 and r.al_extent_size == 1 << 20
    assert r.fence_command == "/usr/local/bin/fence beta"
    a = r.node("alpha")
    assert (a.service_address, a.service_interface, a.mount_point) == (
        "10.0.0.10/24", "eth0", "/srv/data")


def test_tcp_export_and_ipv6_address(setup_dir: Path, config_text):
    text = config_text(setup_dir).replace('address = "10.0.0.1:7789"', 'address = "[fd00::1]:7789"')
    text = text.replace(f'export = "unix:{setup_dir}/r0.nbd"', 'export = "tcp:127.0.0.1:10809"')
    a = parse_config(text).resource("r0").node("alpha")
    assert a.address == ("fd00::1", 7789) and a.address_str() == "[fd00::1]:7789"
    assert a.export_uri() == "nbd://127.0.0.1:10809"
    assert a.export.nbdkit_args() == ["-i", "127.0.0.1", "-p", "10809"]


def _err(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, P)
    return str(ei.value)


def _variant(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old,new,expected", [
    # unknown key at each level
    ("[resource.r0]", "colour = 1\n[resource.r0]",
     f"{P}: colour: unknown key (allowed: group, resource)"),
    ('track-size = "64KiB"', 'track-size = "64KiB"\ntrak-size = 1',
     f"{P}: resource.r0.trak-size: unknown key (did you mean 'track-size'?)"),
    ('device = ', 'devise = "/x"\ndevice = ',
     f"{P}: resource.r0.on.alpha.devise: unknown key (did you mean 'device'?)"),
    # bad sizes
    ('track-size = "64KiB"', 'track-size = "64KB"',
     f"{P}: resource.r0.track-size: '64KB' is not a size (use e.g. 64KiB"),
    ('ring-size = "64MiB"', 'ring-size = "lots"',
     f"{P}: resource.r0.ring-size: 'lots' is not a size (use e.g. 64KiB)"),
    ('ring-size = "64MiB"', 'ring-size = "64 furlongs"',
     f"{P}: resource.r0.ring-size: '64 furlongs' is not a size: unknown unit 'furlongs'"),
    ('track-size = "64KiB"', 'track-size = "48KiB"',
     f"{P}: resource.r0.track-size: '48KiB' must be a power of two and at least 4KiB"),
    ('track-size = "64KiB"', 'track-size = "2KiB"',
     f"{P}: resource.r0.track-size: '2KiB' must be a power of two and at least 4KiB"),
    ('ring-size = "64MiB"', 'ring-size = "512KiB"',
     f"{P}: resource.r0.ring-size: '512KiB' is too small (at least 1MiB)"),
    ('track-size = "64KiB"', 'track-size = "64KiB"\nal-extent-size = "96KiB"',
     f"{P}: resource.r0.al-extent-size: '96KiB' must be a multiple of track-size (65536 bytes)"),
    ('track-size = "64KiB"', 'track-size = "64KiB"\nbatch-interval = "2"',
     f"{P}: resource.r0.batch-interval: '2' has no unit (use e.g. 2ms or 2s)"),
    ('track-size = "64KiB"', 'track-size = "64KiB"\ndrain-timeout = "2h"',
     f"{P}: resource.r0.drain-timeout: '2h' is too long (at most 1h)"),
    ('track-size = "64KiB"', 'track-size = "64KiB"\nconnections = 0',
     f"{P}: resource.r0.connections: 0 is out of range (1..64)"),
    ('track-size = "64KiB"', 'track-size = "64KiB"\nconnections = "2"',
     f"{P}: resource.r0.connections: must be an integer, not a string"),
    # bad addresses
    ('"10.0.0.1:7789"', '"10.0.0.1"',
     f"{P}: resource.r0.on.alpha.address: '10.0.0.1' has no port (use host:port"),
    ('"10.0.0.1:7789"', '"10.0.0.300:7789"',
     f"{P}: resource.r0.on.alpha.address: '10.0.0.300:7789': '10.0.0.300' is not an IPv4 address"),
    ('"10.0.0.1:7789"', '"10.0.0.1:70000"',
     f"{P}: resource.r0.on.alpha.address: '10.0.0.1:70000': port '70000' is not a port number"),
    ('"10.0.0.1:7789"', '"fd00::1:7789"',
     f"{P}: resource.r0.on.alpha.address: 'fd00::1:7789': write an IPv6 address in brackets"),
    ('"10.0.0.1:7789"', '"bad_host!:7789"',
     f"{P}: resource.r0.on.alpha.address: 'bad_host!:7789': 'bad_host!' is not a host name"),
    ('export = "unix:', 'export = "nbd:',
     f"{P}: resource.r0.on.alpha.export: 'nbd:"),
    ('device = "', 'device = "relative/',
     f"{P}: resource.r0.on.alpha.device: 'relative/"),
    # missing required keys
    ('secret-file = ', 'secret-fil = ', f"{P}: resource.r0.secret-fil: unknown key"),
    ('address = "10.0.0.2:7789"\n', '',
     f"{P}: resource.r0.on.beta.address: required key is missing"),
])
def test_config_error_names_file_key_and_problem(setup_dir, config_text, old, new, expected):
    msg = _err(_variant(config_text(setup_dir), old, new))
    assert msg.startswith(expected), f"\n got: {msg}\nwant: {expected}..."


def test_missing_secret_file_key_is_named(setup_dir, config_text):
    text = "\n".join(l for l in config_text(setup_dir).splitlines() if "secret-file" not in l)
    assert _err(text) == f"{P}: resource.r0.secret-file: required key is missing"


def test_one_node_only_is_refused(setup_dir, config_text):
    text = config_text(setup_dir).split("[resource.r0.on.beta]")[0]
    assert _err(text) == f"{P}: resource.r0.on: a resource needs exactly two nodes, found 1 (alpha)"


def test_three_nodes_are_refused(setup_dir, config_text):
    text = config_text(setup_dir) + textwrap.dedent("""
        [resource.r0.on.gamma]
        address = "10.0.0.3:7789"
        device = "/dev/sdc"
        meta-dir = "/var/lib/duplex/r0"
        """)
    assert _err(text) == (f"{P}: resource.r0.on: a resource needs exactly two nodes, "
                          f"found 3 (alpha, beta, gamma)")


def test_no_nodes_table_is_refused(setup_dir, config_text):
    text = config_text(setup_dir).split("[resource.r0.on.alpha]")[0]
    assert _err(text) == f"{P}: resource.r0.on: required key is missing"


def test_service_address_needs_an_interface(setup_dir, config_text):
    text = config_text(setup_dir, extra_alpha='service-address = "10.0.0.10/24"')
    assert _err(text) == (f"{P}: resource.r0.on.alpha.service-interface: required when "
                          f"service-address is set (the interface to put it on)")


def test_not_toml_and_empty_file_are_refused():
    assert _err("[resource.r0\n").startswith(f"{P}: not valid TOML: ")
    assert _err("") == f"{P}: no resources (add a [resource.NAME] table)"


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "nope.toml")
    assert str(ei.value) == f"{tmp_path}/nope.toml: configuration file does not exist (use --config FILE)"


def test_unknown_resource_lists_the_configured_ones(config_file):
    with pytest.raises(ConfigError) as ei:
        load_config(config_file).resource("r9")
    assert str(ei.value) == f"{config_file}: no resource 'r9' (configured: r0)"


def test_node_not_found_names_the_nodes(config_file):
    r = load_config(config_file).resource("r0")
    with pytest.raises(ConfigError) as ei:
        select_node(r, "gamma")
    assert str(ei.value) == f"{config_file}: resource r0 has no node 'gamma' (its nodes: alpha, beta)"


def test_host_name_selects_the_node_or_says_this_host_is_not_one(config_file, monkeypatch):
    r = load_config(config_file).resource("r0")
    monkeypatch.setattr("socket.gethostname", lambda: "beta.example.com")
    assert select_node(r).name == "beta"  # the short form of the host name matches
    monkeypatch.setattr("socket.gethostname", lambda: "gamma")
    with pytest.raises(ConfigError) as ei:
        select_node(r)
    assert str(ei.value) == (f"{config_file}: this host (gamma) is not a node of resource r0 "
                             f"(its nodes: alpha, beta); use --node NAME")


@pytest.mark.parametrize("mode,content,expected", [
    (0o600, "", "is empty"),
    (0o644, "x", "is readable by every user (mode 0644); run chmod 600"),
])
def test_bad_secret_file_is_refused_when_loaded(config_file, setup_dir, mode, content, expected):
    secret = setup_dir / "r0.secret"
    secret.write_text(content)
    os.chmod(secret, mode)
    r = load_config(config_file).resource("r0")  # loading the config does not read it
    with pytest.raises(ConfigError) as ei:
        r.secret()
    assert str(ei.value) == f"{config_file}: resource.r0.secret-file: {secret} {expected}" + (
        f" {secret}" if "chmod" in expected else "")


def test_missing_secret_file_is_refused_when_loaded(config_file, setup_dir):
    (setup_dir / "r0.secret").unlink()
    with pytest.raises(ConfigError) as ei:
        load_config(config_file).resource("r0").secret()
    assert str(ei.value) == (f"{config_file}: resource.r0.secret-file: "
                             f"{setup_dir}/r0.secret does not exist")


def test_parse_address_forms():
    assert parse_address("alpha.example.com:7789") == ("alpha.example.com", 7789)
    assert parse_address("[::1]:1") == ("::1", 1)
    with pytest.raises(ValueError, match="is not an IPv6 address"):
        parse_address("[zz::1]:7789")
