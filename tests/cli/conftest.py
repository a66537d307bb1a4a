"""Fixtures for config/metadata/CLI tests: a valid two-node config in a
temporary directory, with its secret file and device images."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest


def config_text(tmp: Path, extra_resource: str = "", extra_alpha: str = "") -> str:
    """A valid config for resource r0 with nodes alpha and beta, all files under *tmp*."""
    return textwrap.dedent(f"""\
        [resource.r0]
        secret-file = "{tmp}/r0.secret"
        track-size = "64KiB"
        ring-size = "64MiB"
        journal-size = "16MiB"
        {extra_resource}

        [resource.r0.on.alpha]
        address = "10.0.0.1:7789"
        device = "{tmp}/alpha.img"
        meta-dir = "{tmp}/alpha-meta"
        export = "unix:{tmp}/r0.nbd"
        {extra_alpha}

        [resource.r0.on.beta]
        address = "10.0.0.2:7789"
        device = "{tmp}/beta.img"
        meta-dir = "{tmp}/beta-meta"
        """)


@pytest.fixture(name="config_text")
def config_text_fixture():
    """The :func:`config_text` function (fixtures avoid importing conftest)."""
    return config_text


@pytest.fixture
def setup_dir(tmp_path: Path) -> Path:
    """tmp_path with a 0600 secret file and two 4 MiB device images."""
    secret = tmp_path / "r0.secret"
    secret.write_text("s3cret-value\n")
    os.chmod(secret, 0o600)
    for name in ("alpha.img", "beta.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(4 << 20)
    return tmp_path


@pytest.fixture
def config_file(setup_dir: Path) -> Path:
    """A valid duplex.toml in setup_dir."""
    path = setup_dir / "duplex.toml"
    path.write_text(config_text(setup_dir))
    return path
