"""The role lives in the metadata: ``duplex up`` takes it from there, and a
``--role`` that disagrees is refused naming promote/demote -- except on
fresh metadata, where ``--role`` decides (the lab and the demo rely on it)."""
from __future__ import annotations

import os

import pytest

from replicator import cli
from replicator.errors import DuplexError
from replicator.metadata import create_metadata, load_metadata, new_uuid
from replicator.node import metadata_is_fresh, resolve_role


@pytest.fixture
def md(tmp_path):
    return create_metadata(tmp_path / "meta", "r0", "beta", 1 << 20, 65536, assume_clean=True)


def test_role_of_fresh_metadata_is_chosen_by_up_and_recorded(md):
    assert metadata_is_fresh(md)
    assert resolve_role(md, "primary") == "Primary"
    assert load_metadata(md.meta_dir, "r0").role == "Primary"
    assert resolve_role(md, None) == "Primary"


def test_up_without_role_starts_the_role_in_the_metadata(md):
    md.seq_hwm = 10
    md.save()
    assert resolve_role(md, None) == "Secondary"
    assert resolve_role(md, "secondary") == "Secondary"


def test_role_primary_on_a_used_secondary_is_refused_naming_promote(md):
    md.peer_node_uuid = new_uuid()  # it met its primary: it was used as secondary
    md.save()
    assert not metadata_is_fresh(md)
    with pytest.raises(DuplexError, match=r"--role primary disagrees.*Secondary.*duplex promote r0"):
        resolve_role(md, "primary")
    assert load_metadata(md.meta_dir, "r0").role == "Secondary"


def test_role_secondary_on_a_used_primary_is_refused_naming_demote(md):
    md.role = "Primary"
    md.seq_hwm = 1 << 24  # a primary reserved seqs: it was used
    md.save()
    with pytest.raises(DuplexError, match=r"--role secondary disagrees.*Primary.*duplex demote r0"):
        resolve_role(md, "secondary")


def test_up_with_a_disagreeing_role_is_a_one_line_error(tmp_path, capsys, md):
    secret = tmp_path / "s"
    secret.write_text("x\n")
    os.chmod(secret, 0o600)
    (tmp_path / "b.img").write_bytes(bytes(1 << 20))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[resource.r0]
secret-file = "{secret}"
[resource.r0.on.alpha]
address = "10.0.0.1:7789"
device = "{tmp_path}/a.img"
meta-dir = "{tmp_path}/ma"
[resource.r0.on.beta]
address = "10.0.0.2:7789"
device = "{tmp_path}/b.img"
meta-dir = "{md.meta_dir}"
""")
    md.history = [new_uuid()]  # promoted once
    md.role = "Primary"
    md.save()
    code = cli.main(["--config", str(cfg), "--node", "beta", "up", "r0", "--role", "secondary"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "duplex: error: r0: --role secondary disagrees" in err and "duplex demote r0" in err
