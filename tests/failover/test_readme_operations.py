"""Every command the README's Operations section shows is run by a test,
as written; and the Configuration section's key table names every key
replicator/config.py accepts.

The commands are read from the fenced code blocks of the Operations
section: one command per line (a line of only a comment continues the one
above; ``a && b`` is two commands), and a synopsis's optional parts
(``duplex promote r0 [--force] [--json]``) are each a command of their own,
with the base. :data:`RUN_BY` maps each to the test that runs it and the
argv as that test (or the fixture it calls) writes it; each entry of a
command the README shows is checked: the test exists, and the argv, with
the command's options, is in that test (or a function of its module that
it calls), or in the fixture file named as holding it. A README command with no entry fails
here, naming it: whoever documents a command says where it is tested.
"""
from __future__ import annotations

import ast
import os
import re
from contextlib import ExitStack
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

#: README command -> (the test that runs it, the file that holds the argv,
#: the argv as written there; whitespace is compared collapsed). The file
#: is the test module itself, or the fixture or helper the test calls.
RUN_BY: dict[str, tuple[str, str, str]] = {
    "duplex create-md r0 --assume-clean": (
        "tests/failover/test_promote.py::test_loss_report_matches_the_primary_history_after_link_cut_and_kill",
        "tests/fixtures/duplex_lab.py",
        'self.duplex(node, "create-md", RESOURCE, *(["--assume-clean"] if assume_clean else []))'),
    "duplex create-md r0": (
        "tests/e2e/test_primary_faults.py", "tests/e2e/test_primary_faults.py",
        "create_md(assume_clean=False)"),
    "duplex up r0 --role secondary": (
        "tests/failover/test_promote.py::test_loss_report_matches_the_primary_history_after_link_cut_and_kill",
        "tests/fixtures/duplex_lab.py", '"up", RESOURCE, "--role", "secondary"'),
    "duplex up r0 --role primary": (
        "tests/failover/test_promote.py::test_loss_report_matches_the_primary_history_after_link_cut_and_kill",
        "tests/fixtures/duplex_lab.py", '"up", RESOURCE, "--role", "primary"'),
    "duplex attach r0": (
        "tests/cli/test_attach.py", "tests/cli/test_attach.py", '"attach", "r0"'),
    "mkfs.ext4 /dev/loop0": (
        "tests/failover/test_disaster.py::test_failover_after_disaster_keeps_every_transaction_committed_through_a",
        "tests/failover/test_disaster.py", 'mkfs(dev.path, "ext4")'),
    "mount /dev/loop0 /mnt": (
        "tests/failover/test_disaster.py::test_failover_after_disaster_keeps_every_transaction_committed_through_a",
        "tests/failover/test_disaster.py", 'mounted(dev.path, tmp_path / "alpha-mnt", fstype="ext4")'),
    "duplex status r0": (
        "tests/failover/test_systemd_nspawn.py::test_unit_replicates_and_restarts_as_primary_after_promote_under_real_systemd",
        "tests/failover/test_systemd_nspawn.py", '"duplex", "status", "r0", "--json"'),
    "duplex status r0 --verbose": (
        "tests/cli/test_cli.py::test_status_of_a_stopped_resource_comes_from_metadata",
        "tests/cli/test_cli.py", '"status", "r0", "--verbose"'),
    "duplex events r0": (
        "tests/e2e/test_events_scenario.py::test_a_cut_a_catch_up_and_a_promote_followed_through_the_event_lines",
        "tests/e2e/test_events_scenario.py", '"--node", node, "events", RESOURCE, *args'),
    "duplex detach r0": (
        "tests/e2e/test_stop_attached.py", "tests/e2e/test_stop_attached.py", '"detach", RESOURCE'),
    "duplex promote r0": (
        "tests/failover/test_systemd_nspawn.py::test_unit_replicates_and_restarts_as_primary_after_promote_under_real_systemd",
        "tests/failover/test_systemd_nspawn.py", '"duplex", "promote", "r0", "--wait", "30"'),
    "duplex promote r0 --force": (
        "tests/failover/test_promote.py", "tests/failover/test_promote.py", '"--force"'),
    "duplex promote r0 --json": (
        "tests/failover/test_promote.py::test_loss_report_matches_the_primary_history_after_link_cut_and_kill",
        "tests/failover/_failover_helpers.py", '"promote", RESOURCE, "--json", *args'),
    "duplex promote r0 --timeout S": (
        "tests/e2e/test_secondary_disk_full.py", "tests/e2e/test_secondary_disk_full.py",
        '"--timeout"'),
    "duplex promote r0 --wait S": (
        "tests/failover/test_promote_wait.py", "tests/failover/test_promote_wait.py", '"--wait"'),
    "duplex up r0": (
        "tests/failover/test_systemd_nspawn.py::test_unit_replicates_and_restarts_as_primary_after_promote_under_real_systemd",
        "systemd/duplex@.service", "ExecStart=/usr/local/bin/duplex up %i"),
    "scripts/failover r0": (
        "tests/failover/test_disaster.py::test_failover_after_disaster_keeps_every_transaction_committed_through_a",
        "tests/failover/test_disaster.py", "r = run_failover(lab)"),
    "scripts/failover r0 --no-fence": (
        "tests/failover/test_failover_dryrun.py::test_dry_run_announces_what_the_run_does_and_then_that_it_would_skip_every_step",
        "tests/failover/test_failover_dryrun.py", 'run_failover(lab, "--no-fence")'),
    "scripts/failover r0 --dry-run": (
        "tests/failover/test_failover_dryrun.py::test_dry_run_announces_what_the_run_does_and_then_that_it_would_skip_every_step",
        "tests/failover/test_failover_dryrun.py", 'run_failover(lab, "--dry-run")'),
    "duplex demote r0": (
        "tests/e2e/test_generations.py", "tests/e2e/test_generations.py", '"demote", RESOURCE'),
    "duplex down r0": (
        "tests/failover/test_down.py", "tests/failover/test_down.py", '"down", RESOURCE'),
    "duplex status g0": (
        "tests/failover/test_readme_operations.py::test_duplex_status_g0_shows_the_point_exposure_releases_and_clock_skew",
        "tests/failover/test_readme_operations.py", 'lab.duplex("beta", "status", "g0")'),
    "duplex promote g0": (
        "tests/e2e/test_group_failover.py", "tests/e2e/test_group_failover.py", '"promote", "g0"'),
    "duplex connect r0 --discard-my-data": (
        "tests/e2e/test_generations.py", "tests/e2e/test_generations.py", '"--discard-my-data"'),
    "duplex verify r0": (
        "tests/e2e/test_verify.py", "tests/e2e/test_verify.py", '"verify", RESOURCE'),
    "duplex verify r0 --fix": (
        "tests/e2e/test_verify.py", "tests/e2e/test_verify.py", '"--fix"'),
    "duplex verify r0 --json": (
        "tests/e2e/test_verify.py", "tests/e2e/test_verify.py", '"--json"'),
    "duplex primary r0 --force": (
        "tests/failover/test_switchover.py::test_a_fresh_pair_gets_its_first_primary_with_one_command",
        "tests/failover/test_switchover.py", 'lab.duplex("alpha", "primary", RESOURCE, "--force")'),
    "duplex secondary r0": (
        "tests/failover/test_switchover.py::test_switchover_hands_over_cleanly_and_promote_loses_nothing",
        "tests/failover/test_switchover.py", 'lab.duplex("alpha", "secondary", RESOURCE)'),
    "duplex disconnect r0": (
        "tests/failover/test_admin_commands.py::test_disconnect_and_connect_on_the_primary_keep_every_write",
        "tests/failover/test_admin_commands.py", 'lab.duplex("alpha", "disconnect", RESOURCE)'),
    "duplex connect r0": (
        "tests/failover/test_admin_commands.py::test_disconnect_and_connect_on_the_primary_keep_every_write",
        "tests/failover/test_admin_commands.py", 'lab.duplex("alpha", "connect", RESOURCE)'),
    "duplex invalidate r0": (
        "tests/failover/test_admin_commands.py::test_invalidate_on_the_secondary_resyncs_every_track_from_the_primary",
        "tests/failover/test_admin_commands.py", 'lab.duplex("beta", "invalidate", RESOURCE)'),
    "duplex invalidate-remote r0": (
        "tests/failover/test_admin_commands.py::test_invalidate_remote_on_the_primary_resends_every_track",
        "tests/failover/test_admin_commands.py", 'lab.duplex("alpha", "invalidate-remote", RESOURCE)'),
    "duplex pause-sync r0": (
        "tests/failover/test_admin_commands.py::test_pause_sync_stops_the_increments_and_resume_sync_finishes_them",
        "tests/failover/test_admin_commands.py", 'lab.duplex("alpha", "pause-sync", RESOURCE)'),
    "duplex resume-sync r0": (
        "tests/failover/test_admin_commands.py::test_pause_sync_stops_the_increments_and_resume_sync_finishes_them",
        "tests/failover/test_admin_commands.py", 'lab.duplex("alpha", "resume-sync", RESOURCE)'),
    "duplex outdate r0": (
        "tests/failover/test_admin_commands.py::test_outdate_marks_a_disconnected_secondary_until_it_caught_up",
        "tests/failover/test_admin_commands.py", 'lab.duplex("beta", "outdate", RESOURCE)'),
}


def section(text: str, title: str) -> str:
    """The body of the README's ``## title`` section."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if m is None:
        raise AssertionError(f"README.md has no '## {title}' section")
    return m.group(1)


def _strip_comment(line: str) -> str:
    """*line* without its shell comment (a ``#`` outside quotes that starts
    a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _variants(command: str) -> list[str]:
    """A synopsis's commands: the base, and the base with each ``[...]``
    part (brackets dropped), in order."""
    parts = re.findall(r"\[([^\]]+)\]", command)
    base = " ".join(re.sub(r"\[[^\]]+\]", " ", command).split())
    return [base] + [f"{base} {p.strip()}" for p in parts]


def readme_commands(text: str) -> list[str]:
    """Every command of the Operations section's code blocks, in order."""
    body = section(text, "Operations")
    out: list[str] = []
    # Shell blocks only: a ```toml block is configuration, not commands.
    for block in re.findall(r"^```(?:sh|bash|console|shell)?\n(.*?)^```", body, re.M | re.S):
        for raw in block.splitlines():
            line = _strip_comment(raw)
            if not line.strip():
                continue  # blank, or a comment continuing the line above
            for cmd in line.split("&&"):
                for v in _variants(cmd.strip()):
                    if v not in out:
                        out.append(v)
    return out


def _collapse(text: str) -> str:
    return " ".join(text.split())


def test_the_extraction_reads_synopses_comments_and_chains():
    text = ("## Operations\n\n```sh\n"
            "duplex promote r0 [--force] [--timeout S]   # on beta\n"
            "                                            # (a continued comment)\n"
            "mkfs.ext4 /dev/loop0 && mount /dev/loop0 /mnt\n"
            "duplex status r0 --json\n```\n\n```toml\n[resource.r0.handlers]\nsplit-brain = \"x\"\n```\n"
            "\n## Status\n\n```sh\nduplex status --watch\n```\n")
    assert readme_commands(text) == [
        "duplex promote r0", "duplex promote r0 --force", "duplex promote r0 --timeout S",
        "mkfs.ext4 /dev/loop0", "mount /dev/loop0 /mnt", "duplex status r0 --json"]


def test_every_readme_operations_command_is_run_by_a_test():
    commands = readme_commands(README.read_text())
    assert commands, "no command found in the README's Operations code blocks"
    missing = [c for c in commands if c not in RUN_BY]
    assert not missing, (
        "README Operations commands that no test is known to run (add each to RUN_BY in "
        f"{Path(__file__).relative_to(REPO)}, naming the test that runs it):\n  "
        + "\n  ".join(missing))


def _documented() -> list[str]:
    """The RUN_BY entries the README shows now (an entry may come before
    its command is documented: engineers add both at once)."""
    shown = set(readme_commands(README.read_text()))
    return sorted(c for c in RUN_BY if c in shown)


@pytest.mark.parametrize("command", _documented())
def test_the_test_named_for_a_command_runs_it(command):
    test_id, holder, argv = RUN_BY[command]
    path, _, func = test_id.partition("::")
    module = REPO / path
    assert module.is_file(), f"{command!r}: {path} does not exist"
    source = _collapse((REPO / holder).read_text())
    if func:
        text = module.read_text()
        defs = {n.name: n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef)}
        assert func in defs, f"{command!r}: {path} has no test {func}"
        if holder == path:
            # The argv is in that test itself, or in a function of its module
            # that the test calls (a helper such as _status), not elsewhere.
            fn = defs[func]
            called = {n.func.id for n in ast.walk(fn)
                      if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            source = _collapse(" ".join(ast.get_source_segment(text, defs[name]) or ""
                                        for name in {func} | (called & set(defs))))
    assert _collapse(argv) in source, \
        f"{command!r}: {holder} no longer runs it as {argv!r} (update RUN_BY)"
    # The argv carries the command's options (their values may differ).
    for flag in (w for w in command.split() if w.startswith("--")):
        assert flag in argv, f"{command!r}: the argv {argv!r} has no {flag}"


def _readme_keys(text: str) -> set[tuple[str, str]]:
    """(table, key) of every row of the Configuration section's key table."""
    body = section(text, "Configuration")
    out = set()
    for m in re.finditer(r"^\| ([a-z.A-Z]+) \| (`[^|]+`) \|", body, re.M):
        for key in re.findall(r"`([a-z-]+)`", m.group(2)):
            out.add((m.group(1), key))
    return out


def test_the_configuration_section_lists_every_key_config_accepts():
    from replicator import config

    documented = _readme_keys(README.read_text())
    accepted = ({("resource", k) for k in config._RESOURCE_KEYS - {"on"}}
                | {("resource.handlers", k) for k in config._HANDLER_KEYS}
                | {("node", k) for k in config._NODE_KEYS}
                | {("node.volume", k) for k in config._VOLUME_KEYS}
                | {("group", k) for k in config._GROUP_KEYS - {"on"}}
                | {("group.on.NODE", "address")})
    missing = sorted(accepted - documented)
    assert not missing, ("keys replicator/config.py accepts that the README's "
                         "Configuration table does not list: "
                         + ", ".join(f"{t}.{k}" for t, k in missing))


@pytest.mark.system
@pytest.mark.timeout(300)
def test_duplex_status_g0_shows_the_point_exposure_releases_and_clock_skew(tmp_path):
    """README: ``duplex status g0  # a group: its point, exposure, releases,
    clock skew`` -- run as written on a secondary host of the group lab
    (no test ran it before this one)."""
    from fixtures.group_lab import GroupLab
    from fixtures.processes import ProcessGroup

    if os.geteuid() != 0:
        pytest.fail("the group lab needs root (network namespaces)", pytrace=False)
    with ExitStack() as stack:
        procs = stack.enter_context(ProcessGroup(tmp_path / "logs"))
        lab = GroupLab.create(tmp_path / "lab", procs, mode="checkpoint")
        stack.callback(lab.close)
        lab.start_all()
        lab.wait_established()
        lab.wait_group_active()
        r = lab.duplex("beta", "status", "g0")
        lines = r.stdout.splitlines()
        assert lines[0] == "group g0 (checkpoint) on beta", r.stdout
        point = next((ln for ln in lines if ln.strip().startswith("point:")), "")
        assert "(release " in point and "exposure " in point, r.stdout  # point, releases
        assert any(ln.strip().startswith("clocks:") and "largest primary offset" in ln
                   for ln in lines), r.stdout
        member = next(ln.split() for ln in lines if ln.split()[:1] == ["r0"])
        assert member[1:3] == ["Secondary", "active"] and "link up" in " ".join(member), \
            r.stdout
