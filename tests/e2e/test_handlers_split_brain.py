"""The split-brain and fence-peer handlers end to end: a partition, alpha
writes on, beta is promoted and writes too (its promotion runs fence-peer
before the node restarts as Primary), alpha comes back as a secondary:
both nodes see SplitBrain and run split-brain with the state in the
environment. Nothing is merged (the handler changes nothing)."""
from __future__ import annotations

import json

from fixtures.duplex_lab import RESOURCE
from test_generations import _promote_beta, _region, _write


def _env(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_split_brain_runs_its_handler_on_both_nodes_and_promote_fences(make_lab, netns_pair,
                                                                        tmp_path):
    out = tmp_path / "handlers"
    out.mkdir()
    lab = make_lab(size=16 << 20, options={"ping-timeout": "2s", "ping-interval": "500ms"})
    dump = f"env | grep ^DUPLEX_ | sort > {out}/$DUPLEX_EVENT-$DUPLEX_NODE.env"
    lab.config.write_text(lab.config.read_text() + "\n[resource.r0.handlers]\n"
                          + f"split-brain = {json.dumps(dump)}\n"
                          # A second's work: the promoted node waits for it as it stops.
                          + f"fence-peer = {json.dumps('sleep 1; ' + dump)}\n")
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    _write(lab.uri, _region(0, 10, 1))
    lab.wait_drained()

    netns_pair.link_down()
    lab.wait(lambda: lab.control("beta")["connection"] != "Connected", "beta to notice")
    _write(lab.uri, _region(4 << 20, 4, 2))
    _promote_beta(lab)
    lab.secondary.wait(20)
    # The promotion's fence-peer ran before the secondary stopped.
    fence = _env(out / "fence-peer-beta.env")
    assert fence["DUPLEX_EVENT_LINE"].startswith("event promote name:r0 node:beta "), fence
    assert (fence["DUPLEX_PEER"], fence["DUPLEX_EVENT"]) == ("alpha", "fence-peer"), fence
    lab.wait(lambda: (out / "fence-peer-alpha.env").exists(), "alpha's fence-peer (peer lost)",
             timeout=30, proc=lab.primary)
    assert _env(out / "fence-peer-alpha.env")["DUPLEX_ROLE"] == "Primary"

    beta = lab.start_up("beta", name="beta-primary")
    lab.wait(lambda: lab.control("beta")["role"] == "Primary", "beta to serve", proc=beta)
    _write(lab.export_uri("beta"), _region(8 << 20, 4, 3))
    lab.primary.stop(grace=30)
    lab.duplex("alpha", "demote", RESOURCE)
    alpha = lab.start_up("alpha", name="alpha-secondary")
    netns_pair.link_up()
    lab.wait(lambda: (out / "split-brain-beta.env").exists()
             and (out / "split-brain-alpha.env").exists(),
             "split-brain on both nodes", timeout=60, proc=alpha)
    for node, peer, role in (("alpha", "beta", "Secondary"), ("beta", "alpha", "Primary")):
        env = _env(out / f"split-brain-{node}.env")
        assert (env["DUPLEX_RESOURCE"], env["DUPLEX_NODE"], env["DUPLEX_PEER"],
                env["DUPLEX_ROLE"], env["DUPLEX_REPLICATION"]) == (
            RESOURCE, node, peer, role, "SplitBrain"), env
        assert env["DUPLEX_EVENT_LINE"].startswith(
            f"change peer-device name:r0 peer-node-id:{peer} replication:SplitBrain"), env
    assert lab.digest("alpha") != lab.digest("beta"), "split brain must not be merged"
    assert alpha.is_running() and beta.is_running()
