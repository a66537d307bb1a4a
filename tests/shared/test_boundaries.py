"""Which package of replicator/ may import which, read from the source with
``ast`` (nothing is imported, so the rules hold for code paths no test runs):

- ``replicator.secondary`` never imports ``replicator.primary``, and the
  reverse: the two roles meet only in shared modules.
- ``replicator.protocol`` imports only itself and the record/CRC helpers
  (``replicator.records``, ``replicator.crc32c``), and those reach only
  their fast paths in the C core (``replicator.native.records``,
  ``replicator.native.crc32c``, ``replicator.native.ffi``,
  ``replicator._core``): the sans-IO protocol pulls in no engine, daemon,
  socket or config code.
- No ``if TYPE_CHECKING:`` import block in ``replicator.primary``: the
  primary's parts get narrow collaborators, not a hidden back-pointer.
- The graph of module-level imports (``if TYPE_CHECKING:`` blocks
  included, as they are how a cycle hides; imports inside functions left
  out, as they run later) has no cycle.

Each checker is a function of a source tree, so the tests at the bottom
run it on small broken trees in tmp_path and show that it fails there.
"""
from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "replicator"

# What protocol modules may import directly, besides replicator.protocol.*.
PROTOCOL_MAY_IMPORT = frozenset({"replicator.records", "replicator.crc32c"})
# What may be reached from protocol at all (any depth, lazy imports too):
# the helpers above and the C fast paths they try first.
PROTOCOL_MAY_REACH = PROTOCOL_MAY_IMPORT | {
    "replicator.native.records", "replicator.native.crc32c", "replicator.native.ffi",
    "replicator._core"}


@dataclass(frozen=True)
class Import:
    """One import statement's target inside the package."""

    source: str          # importing module, dotted
    target: str          # imported module (or package), dotted
    path: str            # importing file, relative to the tree root
    line: int
    module_level: bool   # runs at import time (not inside a function)
    type_checking: bool  # inside an ``if TYPE_CHECKING:`` block

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def scan_tree(root: Path, package: str = PACKAGE) -> tuple[set[str], list[Import]]:
    """Every module of *package* under *root* and every import among them
    (targets outside the package, such as the standard library, dropped)."""
    files = sorted((root / package).rglob("*.py"))
    modules = {_module_name(f.relative_to(root)) for f in files}
    packages = {_module_name(f.relative_to(root)) for f in files if f.name == "__init__.py"}
    imports: list[Import] = []
    for f in files:
        rel = f.relative_to(root)
        name = _module_name(rel)
        this_pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(rel))

        def add(target: str, node: ast.stmt, module_level: bool, tc: bool) -> None:
            if target == package or target.startswith(package + "."):
                imports.append(Import(name, target, str(rel), node.lineno, module_level, tc))

        def visit(body: list[ast.stmt], module_level: bool, tc: bool) -> None:
            for node in body:
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        add(alias.name, node, module_level, tc)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:  # relative: from the package upwards
                        base_parts = this_pkg.split(".")
                        base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                        base = ".".join(base_parts + ([node.module] if node.module else []))
                    else:
                        base = node.module or ""
                    for alias in node.names:
                        sub = f"{base}.{alias.name}"
                        # `from pkg import mod` imports the submodule mod.
                        add(sub if sub in modules else base, node, module_level, tc)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(node.body, False, tc)
                elif isinstance(node, ast.If) and _is_type_checking(node.test):
                    visit(node.body, module_level, True)
                    visit(node.orelse, module_level, tc)
                else:  # try, with, class bodies, match cases: same level
                    for field in ("body", "orelse", "finalbody"):
                        visit(getattr(node, field, None) or [], module_level, tc)
                    for sub in getattr(node, "handlers", []) + getattr(node, "cases", []):
                        visit(sub.body, module_level, tc)

        visit(tree.body, True, False)
    assert packages <= modules
    return modules, imports


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def role_violations(imports: list[Import]) -> list[str]:
    """Imports from one role's package into the other's, any kind."""
    primary, secondary = f"{PACKAGE}.primary", f"{PACKAGE}.secondary"
    return [str(i) for i in imports
            if (_in(i.source, secondary) and _in(i.target, primary))
            or (_in(i.source, primary) and _in(i.target, secondary))]


def protocol_violations(imports: list[Import]) -> list[str]:
    """Protocol imports beyond itself and the record/CRC helpers, directly
    or through what those helpers import."""
    protocol = f"{PACKAGE}.protocol"
    out = [str(i) for i in imports if _in(i.source, protocol)
           and not _in(i.target, protocol) and i.target not in PROTOCOL_MAY_IMPORT]
    by_source: dict[str, list[Import]] = {}
    for i in imports:
        by_source.setdefault(i.source, []).append(i)
    seen: set[str] = set()
    todo = sorted(PROTOCOL_MAY_IMPORT)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for i in by_source.get(m, []):
            if i.target not in PROTOCOL_MAY_REACH and not _in(i.target, protocol):
                out.append(f"{i} (reached from {protocol} through the record/CRC helpers)")
            else:
                todo.append(i.target)
    return out


def type_checking_imports(imports: list[Import], package: str) -> list[str]:
    """Imports inside ``if TYPE_CHECKING:`` blocks of *package*."""
    return [str(i) for i in imports if i.type_checking and _in(i.source, package)]


def import_cycles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """Each cycle of module-level imports, as a closed path of module names
    (one per strongly connected component; Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        if i.module_level and i.target in modules and i.target != i.source:
            graph[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            strong(m)
    return [_cycle_path(graph, comp) for comp in components]


def _cycle_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """The shortest closed path through a strongly connected component from
    its first member, for the message."""
    members, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first from start until an edge leads back
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{comp} is not strongly connected")


def _report(what: str, lines: list[str]) -> str:
    return f"{what}:\n  " + "\n  ".join(lines)


# ---- the rules, on the real tree -------------------------------------------

_MODULES, _IMPORTS = scan_tree(REPO)


def test_the_scan_sees_the_package() -> None:
    # A scan that found nothing would pass every rule below.
    assert {"replicator.protocol.frames", "replicator.primary.engine",
            "replicator.secondary.daemon", "replicator.native.core"} <= _MODULES
    assert any(i.source == "replicator.protocol.frames" and i.target == "replicator.crc32c"
               for i in _IMPORTS)


def test_secondary_and_primary_never_import_each_other() -> None:
    bad = role_violations(_IMPORTS)
    assert not bad, _report("imports across the roles", bad)


def test_protocol_imports_only_itself_and_the_record_helpers() -> None:
    bad = protocol_violations(_IMPORTS)
    assert not bad, _report("protocol imports outside its boundary", bad)


def test_primary_has_no_type_checking_imports() -> None:
    bad = type_checking_imports(_IMPORTS, f"{PACKAGE}.primary")
    assert not bad, _report("TYPE_CHECKING imports in replicator.primary", bad)


def test_module_level_imports_have_no_cycle() -> None:
    cycles = import_cycles(_MODULES, _IMPORTS)
    assert not cycles, _report("import cycles", [" -> ".join(c) for c in cycles])


# ---- each checker fails on a broken tree -----------------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


def _clean_files() -> dict[str, str]:
    return {
        "replicator/__init__.py": "",
        "replicator/crc32c.py": "try:\n    from replicator.native.crc32c import crc32c\n"
                                "except ImportError:\n    crc32c = None\n",
        "replicator/records.py": "from replicator.crc32c import crc32c\n",
        "replicator/tracks.py": "import hashlib\n",
        "replicator/native/__init__.py": "",
        "replicator/native/ffi.py": "from replicator._core import ffi, lib\n",
        "replicator/native/crc32c.py": "from replicator.native.ffi import lib\n",
        "replicator/protocol/__init__.py": "from replicator.protocol.frames import Frame\n",
        "replicator/protocol/frames.py": "from replicator.crc32c import crc32c\n"
                                         "from replicator import records\n",
        "replicator/primary/__init__.py": "",
        "replicator/primary/engine.py": "from replicator.tracks import x\n"
                                        "from .shipper import Shipper\n",
        "replicator/primary/shipper.py": "from replicator.native import ffi\n",
        "replicator/secondary/__init__.py": "",
        "replicator/secondary/daemon.py": "from replicator import tracks\n",
    }


def test_checkers_pass_a_clean_tree(tmp_path: Path) -> None:
    modules, imports = scan_tree(_tree(tmp_path, _clean_files()))
    assert role_violations(imports) == []
    assert protocol_violations(imports) == []
    assert type_checking_imports(imports, "replicator.primary") == []
    assert import_cycles(modules, imports) == []
    # Relative and `from pkg import submodule` imports resolve to the module.
    targets = {(i.source, i.target) for i in imports}
    assert ("replicator.primary.engine", "replicator.primary.shipper") in targets
    assert ("replicator.protocol.frames", "replicator.records") in targets


def test_role_check_fails_when_secondary_imports_primary(tmp_path: Path) -> None:
    files = _clean_files()
    files["replicator/secondary/daemon.py"] += (
        "def late():\n    from replicator.primary.engine import Engine\n")
    files["replicator/primary/shipper.py"] += "import replicator.secondary.daemon\n"
    _, imports = scan_tree(_tree(tmp_path, files))
    assert role_violations(imports) == [
        "replicator/primary/shipper.py:2 imports replicator.secondary.daemon",
        "replicator/secondary/daemon.py:3 imports replicator.primary.engine"]


def test_protocol_check_fails_on_a_direct_and_on_a_hidden_import(tmp_path: Path) -> None:
    files = _clean_files()
    files["replicator/protocol/frames.py"] += "from replicator.native import ffi\n"
    # records.py pulls in the secondary: protocol would reach it through the helper.
    files["replicator/records.py"] += "from replicator.secondary.daemon import x\n"
    _, imports = scan_tree(_tree(tmp_path, files))
    bad = protocol_violations(imports)
    assert bad == [
        "replicator/protocol/frames.py:3 imports replicator.native.ffi",
        "replicator/records.py:2 imports replicator.secondary.daemon "
        "(reached from replicator.protocol through the record/CRC helpers)"], bad


def test_type_checking_check_fails_on_a_guarded_import(tmp_path: Path) -> None:
    files = _clean_files()
    files["replicator/primary/shipper.py"] = (
        "import typing\nif typing.TYPE_CHECKING:\n    from replicator.primary.engine import E\n")
    _, imports = scan_tree(_tree(tmp_path, files))
    assert type_checking_imports(imports, "replicator.primary") == [
        "replicator/primary/shipper.py:3 imports replicator.primary.engine"]


def test_cycle_check_fails_on_a_cycle_hidden_behind_type_checking(tmp_path: Path) -> None:
    files = _clean_files()
    files["replicator/primary/shipper.py"] = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from replicator.primary.engine import Engine\n")
    modules, imports = scan_tree(_tree(tmp_path, files))
    assert import_cycles(modules, imports) == [
        ["replicator.primary.engine", "replicator.primary.shipper", "replicator.primary.engine"]]


def test_cycle_check_ignores_imports_inside_functions(tmp_path: Path) -> None:
    files = _clean_files()
    files["replicator/primary/shipper.py"] = (
        "def late():\n    from replicator.primary.engine import Engine\n")
    modules, imports = scan_tree(_tree(tmp_path, files))
    assert import_cycles(modules, imports) == []


def test_checkers_fail_on_a_broken_copy_of_the_real_tree(tmp_path: Path) -> None:
    shutil.copytree(REPO / PACKAGE, tmp_path / PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    daemon = tmp_path / PACKAGE / "secondary" / "daemon.py"
    daemon.write_text(daemon.read_text(encoding="utf-8")
                      + "\nfrom replicator.primary.engine import Engine  # broken on purpose\n",
                      encoding="utf-8")
    frames = tmp_path / PACKAGE / "protocol" / "frames.py"
    frames.write_text(frames.read_text(encoding="utf-8")
                      + "\nimport replicator.config  # broken on purpose\n", encoding="utf-8")
    modules, imports = scan_tree(tmp_path)
    assert any(v.startswith("replicator/secondary/daemon.py:")
               and v.endswith("imports replicator.primary.engine")
               for v in role_violations(imports))
    assert any(v.startswith("replicator/protocol/frames.py:")
               and v.endswith("imports replicator.config")
               for v in protocol_violations(imports))
