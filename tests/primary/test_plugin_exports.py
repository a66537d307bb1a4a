"""The plugin's export callbacks (nbdplugin/plugin.py) over a real
two-volume Engine, with a stand-in for the ``nbdkit`` module nbdkit embeds
(export_name, set_error, the flag constants): each volume is an export
named by it, "" is the first, an unknown name fails the open with ENOENT
(no crash), get_size is per export, and each data callback reaches its
own volume's image. The real nbdkit serving these is in
tests/e2e/test_volumes_primary.py."""
from __future__ import annotations

import errno
import importlib
import sys
import types

import pytest

from replicator.primary.engine import Engine
from test_engine_volumes import DATA_SIZE, WAL_SIZE, _read, engine, vol_config  # noqa: F401


@pytest.fixture
def plugin(engine, monkeypatch):  # noqa: F811 (the fixture imported above)
    fake = types.ModuleType("nbdkit")
    fake.FLAG_FUA = 1 << 1
    fake.errors = []
    fake.name = ""
    fake.export_name = lambda: fake.name
    fake.set_error = fake.errors.append
    monkeypatch.setitem(sys.modules, "nbdkit", fake)
    monkeypatch.delitem(sys.modules, "nbdplugin.plugin", raising=False)
    mod = importlib.import_module("nbdplugin.plugin")
    monkeypatch.setattr(mod, "_engine", engine)
    mod.fake = fake
    yield mod
    monkeypatch.delitem(sys.modules, "nbdplugin.plugin", raising=False)


def _open(plugin, name: str) -> int:
    plugin.fake.name = name
    return plugin.open(False)


def test_every_volume_is_an_export_and_the_default_is_the_first(plugin):
    assert plugin.list_exports(False, False) == ["data", "wal"]
    assert plugin.default_export(False, False) == "data"
    assert [_open(plugin, n) for n in ("", "data", "wal")] == [0, 0, 1]
    assert [plugin.get_size(_open(plugin, n)) for n in ("", "wal")] == [DATA_SIZE, WAL_SIZE]


def test_an_unknown_export_fails_the_open_with_enoent_naming_the_exports(plugin):
    with pytest.raises(plugin.UnknownExport) as ei:
        _open(plugin, "nope\n")
    assert str(ei.value) == "r0: no volume 'nope\\n': the exports are 'data', 'wal'"
    assert plugin.fake.errors == [errno.ENOENT]
    assert _open(plugin, "wal") == 1  # the next client is served as before


def test_data_callbacks_reach_the_volume_of_their_export(plugin, tmp_path):
    h_data, h_wal = _open(plugin, "data"), _open(plugin, "wal")
    plugin.pwrite(h_wal, b"L" * 4096, 65536, 0)
    plugin.pwrite(h_data, b"P" * 4096, 65536, plugin.fake.FLAG_FUA)
    plugin.zero(h_wal, 512, 65536, 0)
    plugin.flush(h_data, 0)
    assert _read(tmp_path / "alpha-wal.img", 65536, 4096) == bytes(512) + b"L" * 3584
    assert _read(tmp_path / "alpha-data.img", 65536, 4096) == b"P" * 4096
    buf = bytearray(4096)
    plugin.pread(h_wal, buf, 65536, 0)
    assert bytes(buf) == bytes(512) + b"L" * 3584
    plugin.trim(h_data, 4096, 65536, 0)
    plugin.pread(h_data, buf, 65536, 0)
    assert bytes(buf) == bytes(4096)
    assert isinstance(plugin._engine, Engine)


def test_a_plain_device_is_served_at_the_default_export_as_before(r0_config, tmp_path,
                                                                   monkeypatch):
    from replicator.config import load_config
    from replicator.node import create_metadata_set
    from replicator.peerlink import PeerLink

    monkeypatch.setattr(PeerLink, "connect",
                        lambda a, **kw: (_ for _ in ()).throw(OSError(errno.ECONNREFUSED, "no")))
    cfg = load_config(str(r0_config))
    res = cfg.resource("r0")
    create_metadata_set(cfg, res, res.node("alpha"), 4 << 20, assume_clean=True, force=False)
    eng = Engine.open(str(r0_config), "r0", "alpha")
    fake = types.ModuleType("nbdkit")
    fake.FLAG_FUA, fake.errors, fake.name = 2, [], ""
    fake.export_name = lambda: fake.name
    fake.set_error = fake.errors.append
    monkeypatch.setitem(sys.modules, "nbdkit", fake)
    monkeypatch.delitem(sys.modules, "nbdplugin.plugin", raising=False)
    mod = importlib.import_module("nbdplugin.plugin")
    monkeypatch.setattr(mod, "_engine", eng)
    try:
        assert mod.list_exports(False, False) == ["default"]
        assert mod.default_export(False, False) == "default"
        for name in ("", "default"):
            fake.name = name
            h = mod.open(False)
            assert h == 0 and mod.get_size(h) == 4 << 20
        fake.name = "data"
        with pytest.raises(mod.UnknownExport):
            mod.open(False)
    finally:
        eng.stop(drain_timeout=0.2)
        monkeypatch.delitem(sys.modules, "nbdplugin.plugin", raising=False)
