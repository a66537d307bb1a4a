"""The documents in the repository and the code that cites them agree.

Every "DESIGN §n" in the code names a section ``## n.`` of docs/DESIGN.md,
and every relative link in README.md and docs/*.md names a file that
exists. Pure file reading: no root, no devices.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DESIGN = REPO / "docs" / "DESIGN.md"
CITING_ROOTS = ("replicator", "nbdplugin", "native", "scripts", "tests")
DOCUMENTS = ("README.md", "docs/DESIGN.md", "docs/BENCHMARKS.md")

# "DESIGN §4", and the sections that follow it in one citation:
# "DESIGN §4, §6", "DESIGN §3 and §5", "DESIGN §§3-5".
_CITATION = re.compile(r"DESIGN\s*§+\s*\d+(?:\s*(?:,|and|or|-|–|to)\s*§*\s*\d+)*")
_NUMBER = re.compile(r"\d+")
_HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def design_sections(text: str) -> list[int]:
    """The section numbers of a design document, from its ``## n. Title`` headings."""
    return [int(n) for n in _HEADING.findall(text)]


def citations(text: str) -> list[tuple[int, int]]:
    """(line, section) for every section a "DESIGN §n" citation in *text* names."""
    out = []
    for m in _CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.extend((line, int(n)) for n in _NUMBER.findall(m.group(0)))
    return out


def _text_files(root: Path):
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".so", ".o"):
            continue
        try:
            yield path, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary


def unresolved_citations(base: Path, roots, sections: set[int], skip=()) -> list[str]:
    """"path:line: DESIGN §n" for every citation under *base*/*roots* whose
    section is not in *sections*."""
    bad = []
    for root in roots:
        for path, text in _text_files(base / root):
            if path in skip:
                continue
            for line, n in citations(text):
                if n not in sections:
                    bad.append(f"{path.relative_to(base)}:{line}: DESIGN §{n}")
    return bad


def broken_links(doc: Path) -> list[str]:
    """"doc: target" for every relative link in the markdown file *doc*
    whose file does not exist (anchors are ignored, web links skipped)."""
    bad = []
    for target in _LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            bad.append(f"{doc.name}: {target}")
    return bad


# -- the repository -----------------------------------------------------------

def test_design_sections_are_numbered_one_to_n_in_order():
    sections = design_sections(DESIGN.read_text(encoding="utf-8"))
    assert sections == list(range(1, len(sections) + 1)), sections


def test_every_design_citation_in_the_code_names_a_section():
    sections = set(design_sections(DESIGN.read_text(encoding="utf-8")))
    found = [c for root in CITING_ROOTS for _, text in _text_files(REPO / root)
             for c in citations(text)]
    assert found, "no DESIGN § citation found at all: the scan is broken"
    bad = unresolved_citations(REPO, CITING_ROOTS, sections, skip={Path(__file__).resolve()})
    assert not bad, f"citations of sections docs/DESIGN.md does not have ({sorted(sections)}):\n" \
                    + "\n".join(bad)


def test_design_citations_in_the_documents_name_a_section():
    sections = set(design_sections(DESIGN.read_text(encoding="utf-8")))
    bad = [f"{doc}:{line}: DESIGN §{n}" for doc in DOCUMENTS
           for line, n in citations((REPO / doc).read_text(encoding="utf-8"))
           if n not in sections]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_links_in_the_documents_name_files_that_exist(doc):
    path = REPO / doc
    assert path.is_file(), f"{doc} is missing"
    assert not broken_links(path)


def test_readme_links_the_design_and_the_benchmarks():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = {t.split("#", 1)[0] for t in _LINK.findall(text)}
    assert {"docs/DESIGN.md", "docs/BENCHMARKS.md"} <= targets, targets


# -- the checks themselves, on synthetic trees -------------------------------

def test_a_citation_of_a_missing_section_is_reported(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text('"""Write path (DESIGN §3)."""\n\n# see DESIGN §99\n')
    (tmp_path / "pkg" / "b.c").write_text("/* DESIGN §4, §12 */\n")
    bad = unresolved_citations(tmp_path, ["pkg"], {1, 2, 3, 4})
    assert bad == ["pkg/a.py:3: DESIGN §99", "pkg/b.c:1: DESIGN §12"]


def test_citations_that_resolve_are_not_reported(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("# DESIGN §3 and §5, DESIGN §§1-2\n")
    assert unresolved_citations(tmp_path, ["pkg"], {1, 2, 3, 5}) == []
    assert [n for _, n in citations("DESIGN §3 and §5, DESIGN §§1-2")] == [3, 5, 1, 2]


def test_headings_give_the_section_numbers():
    text = "# Title\n\n## 1. One\ntext\n## 2. Two\n### 2.1 not a section\n## Notes\n"
    assert design_sections(text) == [1, 2]


def test_a_link_to_a_missing_file_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "DESIGN.md").write_text("# D\n")
    readme = tmp_path / "README.md"
    readme.write_text("[design](docs/DESIGN.md#3-the-write-path) [gone](docs/GONE.md) "
                      "[web](https://example.org/x.md) [here](#status)\n")
    assert broken_links(readme) == ["README.md: docs/GONE.md"]


# -- the module map in replicator/__init__.py ---------------------------------

_MAP_LINE = re.compile(r"^    ((?:[a-z_]+\.)?[a-z_0-9]+)\s{2,}\S", re.MULTILINE)


def module_map(doc: str) -> set[str]:
    """The modules a module-map docstring names (``pkg.mod`` or ``mod``)."""
    return set(_MAP_LINE.findall(doc))


def package_modules(pkg: Path) -> set[str]:
    """Every module of *pkg*, relative to it (``mod``, ``sub.mod``), no
    ``__init__``; subpackages count as their modules."""
    names = set()
    for path in pkg.rglob("*.py"):
        if "__pycache__" in path.parts or path.name == "__init__.py":
            continue
        names.add(".".join(path.relative_to(pkg).with_suffix("").parts))
    return names


def test_the_module_map_names_every_module_and_only_those():
    import replicator
    listed = module_map(replicator.__doc__ or "")
    present = package_modules(REPO / "replicator")
    assert not present - listed, f"modules missing from replicator/__init__.py's map: " \
                                 f"{sorted(present - listed)}"
    assert not listed - present, f"the map names modules that do not exist: " \
                                 f"{sorted(listed - present)}"


def test_module_map_parsing(tmp_path):
    doc = "Title.\n\nGroup:\n    a.b        one\n    c          two\nnot    a line\n"
    assert module_map(doc) == {"a.b", "c"}
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    for name in ("pkg/__init__.py", "pkg/c.py", "pkg/sub/__init__.py", "pkg/sub/b.py"):
        (tmp_path / name).write_text("")
    assert package_modules(tmp_path / "pkg") == {"c", "sub.b"}
