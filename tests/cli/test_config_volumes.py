"""Volume tables in the configuration: several named volumes per node, the
same names on both nodes, and a clear error naming the key otherwise."""
from __future__ import annotations

import textwrap

import pytest

from replicator.config import DEFAULT_VOLUME, ConfigError, parse_config


def _config(alpha_vols: str, beta_vols: str, alpha_extra: str = "") -> str:
    return textwrap.dedent("""\
        [resource.r0]
        secret-file = "/etc/duplex/r0.secret"
        [resource.r0.on.alpha]
        address = "10.0.0.1:7789"
        meta-dir = "/var/lib/duplex/r0"
        {alpha_extra}
        {alpha_vols}
        [resource.r0.on.beta]
        address = "10.0.0.2:7789"
        meta-dir = "/var/lib/duplex/r0"
        {beta_vols}
        """).format(alpha_vols=alpha_vols, beta_vols=beta_vols, alpha_extra=alpha_extra)


def _vols(node: str, *names: str, dev: str = "/dev/sd") -> str:
    out = []
    for i, n in enumerate(names):
        out.append(f'[resource.r0.on.{node}.volume.{n}]\ndevice = "{dev}{chr(98 + i)}"')
    return "\n".join(out)


def test_volume_tables_give_named_volumes_in_config_order():
    cfg = parse_config(_config(_vols("alpha", "data", "wal"), _vols("beta", "data", "wal")))
    a = cfg.resource("r0").node("alpha")
    assert [(v.name, v.device) for v in a.volumes] == [("data", "/dev/sdb"), ("wal", "/dev/sdc")]
    assert a.multi_volume and a.device == "/dev/sdb"


def test_a_plain_device_is_one_default_volume():
    cfg = parse_config(_config('device = "/dev/sdb"', 'device = "/dev/sdb"'))
    a = cfg.resource("r0").node("alpha")
    assert [(v.name, v.device) for v in a.volumes] == [(DEFAULT_VOLUME, "/dev/sdb")]
    assert not a.multi_volume


def test_mount_point_per_volume():
    vols = _vols("alpha", "data", "wal").replace('device = "/dev/sdb"',
                                                  'device = "/dev/sdb"\nmount-point = "/srv/pg"')
    a = parse_config(_config(vols, _vols("beta", "data", "wal"))).resource("r0").node("alpha")
    assert [v.mount_point for v in a.volumes] == ["/srv/pg", None]


@pytest.mark.parametrize("alpha, beta, extra, key, words", [
    (_vols("alpha", "data", "wal"), _vols("beta", "data"), "",
     "resource.r0.on.alpha.volume.wal", "volume 'wal' is on node alpha only"),
    (_vols("alpha", "data"), _vols("beta", "data", "log"), "",
     "resource.r0.on.beta.volume.log", "volume 'log' is on node beta only"),
    (_vols("alpha", "data", "wal"), _vols("beta", "wal", "data"), "",
     "resource.r0.on", "different orders"),
    (_vols("alpha", "data", "wal", dev="/dev/sdx"), _vols("beta", "data", "wal"), "",
     "resource.r0.on.alpha.volume.wal.device", "also volume 'data'"),
    (_vols("alpha", "data"), _vols("beta", "data"), 'device = "/dev/sdb"',
     "resource.r0.on.alpha.device", "beside volume tables"),
    ("", _vols("beta", "data"), "", "resource.r0.on.alpha.device", "is required"),
    (_vols("alpha", "data").replace("device", "devcie"), _vols("beta", "data"), "",
     "resource.r0.on.alpha.volume.data.devcie", "unknown key"),
    (_vols("alpha", "data"), _vols("beta", "data"), 'mount-point = "/srv"',
     "resource.r0.on.alpha.mount-point", "each volume table"),
])
def test_volume_mistakes_name_the_key(alpha, beta, extra, key, words):
    if "sdx" in alpha:  # two volumes on one device
        alpha = alpha.replace("/dev/sdxc", "/dev/sdxb")
    with pytest.raises(ConfigError) as e:
        parse_config(_config(alpha, beta, extra))
    assert key in str(e.value) and words in str(e.value), str(e.value)
