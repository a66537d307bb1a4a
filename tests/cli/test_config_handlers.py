"""``[resource.R.handlers]``: the commands, the lag threshold and the
timeout are parsed; every mistake is a ConfigError naming its key."""
from __future__ import annotations

from pathlib import Path

import pytest

from replicator.config import HANDLER_NAMES, ConfigError, parse_config


def _handlers(config_text, tmp: Path, body: str):
    return parse_config(config_text(tmp, extra_resource="[resource.r0.handlers]\n" + body),
                        "/etc/duplex/duplex.toml").resource("r0").handlers


def test_no_table_means_no_handlers_and_the_defaults(config_text, setup_dir):
    h = parse_config(config_text(setup_dir)).resource("r0").handlers
    assert h.commands == () and h.lag_threshold_s is None and h.timeout_s == 30.0
    assert all(h.command(n) is None for n in HANDLER_NAMES)


def test_every_handler_and_the_tuning_keys_are_read(config_text, setup_dir):
    body = "".join(f'{n} = "/usr/local/bin/on-{n} --x"\n' for n in HANDLER_NAMES)
    body += 'lag-exceeded-threshold = "2.5s"\nhandler-timeout = "5s"\n'
    h = _handlers(config_text, setup_dir, body)
    assert [n for n, _ in h.commands] == list(HANDLER_NAMES)
    assert h.command("split-brain") == "/usr/local/bin/on-split-brain --x"
    assert h.lag_threshold_s == 2.5 and h.timeout_s == 5.0


@pytest.mark.parametrize("body, key, words", [
    ('split-brian = "x"\n', "resource.r0.handlers.split-brian",
     "unknown key (did you mean 'split-brain'?)"),
    ('fence-peer = 3\n', "resource.r0.handlers.fence-peer", "must be a string, not an integer"),
    ('out-of-sync = " "\n', "resource.r0.handlers.out-of-sync", "must not be empty"),
    ('lag-exceeded = "x"\n', "resource.r0.handlers.lag-exceeded-threshold",
     "required key is missing"),
    ('lag-exceeded-threshold = "1s"\n', "resource.r0.handlers.lag-exceeded",
     "required key is missing"),
    ('lag-exceeded = "x"\nlag-exceeded-threshold = "soon"\n',
     "resource.r0.handlers.lag-exceeded-threshold", "is not a duration"),
    ('lag-exceeded = "x"\nlag-exceeded-threshold = "0s"\n',
     "resource.r0.handlers.lag-exceeded-threshold", "must be more than 0"),
    ('handler-timeout = "2h"\n', "resource.r0.handlers.handler-timeout",
     "must be between 100ms and 1h"),
    ('handler-timeout = 30\n', "resource.r0.handlers.handler-timeout", "has no unit"),
])
def test_a_mistake_names_its_key(config_text, setup_dir, body, key, words):
    with pytest.raises(ConfigError) as e:
        _handlers(config_text, setup_dir, body)
    msg = str(e.value)
    assert msg.startswith(f"/etc/duplex/duplex.toml: {key}: "), msg
    assert words in msg, msg


def test_handlers_must_be_a_table(config_text, setup_dir):
    with pytest.raises(ConfigError, match=r"resource\.r0\.handlers: must be a table"):
        parse_config(config_text(setup_dir, extra_resource='handlers = "split-brain"'))
