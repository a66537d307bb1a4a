"""The status of a stopped secondary says when its image alone is behind
its journal: the image and the journal together are the replica, and only
`up` or `promote` replays the journal into the image."""
from __future__ import annotations

import json

from replicator import cli
from replicator.metadata import load_metadata
from replicator.records import OP_WRITE, encode_record
from replicator.secondary.journal import Journal


def _status(config_file, capsys) -> dict:
    assert cli.main(["--config", str(config_file), "--node", "beta", "status", "--json", "r0"]) in (0, 1, 3)
    out = capsys.readouterr().out
    doc = json.loads(out)
    return doc[0] if isinstance(doc, list) else doc


def test_offline_status_of_a_secondary_names_what_its_journal_still_holds(config_file, setup_dir, capsys):
    assert cli.main(["--config", str(config_file), "--node", "beta", "create-md", "r0",
                     "--assume-clean"]) == 0
    capsys.readouterr()
    before = _status(config_file, capsys)
    assert "behind its journal" not in (before["reason"] or ""), before["reason"]

    md = load_metadata(setup_dir / "beta-meta", "r0", "beta")
    with Journal.open(md.paths.journal, bytes.fromhex(md.node_uuid)) as j:
        j.append(b"".join(encode_record(seq, 1_700_000_000 + seq, seq * 4096, 4096, OP_WRITE, b"x" * 4096)
                          for seq in (1, 2, 3)))
        j.commit()
    after = _status(config_file, capsys)
    assert "the image alone is behind its journal" in after["reason"], after["reason"]
    assert "records through seq 3 (the image has seq 0)" in after["reason"]
    assert "`duplex up` or `duplex promote` replays it" in after["reason"]
