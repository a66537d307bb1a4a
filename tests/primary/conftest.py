"""Unit tests of the primary's parts (replicator/primary/) and of the
status they report: pure tables, the shipper with fake links, status
documents through a fake control socket; no namespaces, devices or nbdkit.

Fixture ``r0_config`` -> the path of a valid two-node config (alpha,
beta) in tmp_path, with its secret file (0600) and device images."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def r0_config(tmp_path: Path) -> Path:
    secret = tmp_path / "r0.secret"
    secret.write_text("unit-test-secret\n")
    os.chmod(secret, 0o600)
    for node in ("alpha", "beta"):
        with open(tmp_path / f"{node}.img", "wb") as f:
            f.truncate(4 << 20)
        (tmp_path / f"{node}-meta").mkdir()
    path = tmp_path / "duplex.toml"
    path.write_text(f"""\
[resource.r0]
secret-file = "{secret}"
track-size = "64KiB"
journal-size = "4MiB"

[resource.r0.on.alpha]
address = "10.0.0.1:7789"
device = "{tmp_path}/alpha.img"
meta-dir = "{tmp_path}/alpha-meta"
export = "unix:{tmp_path}/r0.nbd"

[resource.r0.on.beta]
address = "10.0.0.2:7789"
device = "{tmp_path}/beta.img"
meta-dir = "{tmp_path}/beta-meta"
""")
    return path
