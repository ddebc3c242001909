"""Every ``docs/DESIGN.md §x`` that code, tests and docs cite names a section the document has."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"DESIGN\.md`{0,2} (§\d+(?:\.\d+)?(?:, §\d+(?:\.\d+)?)*)")
CITING = ("inrun_megatron", "tests", "launch", "tools", "configs")


def _sections() -> set[str]:
    """Section numbers of the headings ``## 2. Title`` and ``### 2.7 Title``."""
    text = (REPO / "docs" / "DESIGN.md").read_text()
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?\.?) ", text, re.M)}


def test_design_citations_name_existing_sections():
    sections = _sections()
    assert {"1", "1.3", "2", "2.3", "2.7", "3", "4"} <= sections, sorted(sections)
    files = [REPO / "README.md"] + [
        p for d in CITING for p in (REPO / d).rglob("*") if p.suffix in {".py", ".sh", ".yaml"}
    ]
    files.remove(Path(__file__).resolve())  # its patterns are no citations
    cited, bare = {}, []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for match in CITATION.finditer(text):
            for section in re.findall(r"§([\d.]+)", match.group(1)):
                cited.setdefault(section, []).append(path.relative_to(REPO))
        bare += [path.relative_to(REPO) for _ in re.finditer(r"(?<![\w/.])DESIGN §", text)]
    assert not bare, f"citations of a DESIGN document outside the repository: {bare}"
    assert len(cited) >= 5, cited  # the citations are found at all
    unknown = {s: where for s, where in cited.items() if s not in sections}
    assert not unknown, f"sections cited but not in docs/DESIGN.md: {unknown}"


def _layout_entries(document: Path) -> list[str]:
    """The paths of the ``inrun_megatron/ ...`` layout block: top-level names and, indented two
    spaces, the library's own modules and packages (``inrun_megatron/<name>``)."""
    text = document.read_text()
    block = re.search(r"^```\n(inrun_megatron/ .*?)^```", text, re.S | re.M).group(1)
    entries = []
    for line in block.splitlines():
        name = re.match(r"( {0,2})(\S+)", line)
        if name and not line.startswith("   "):
            entries.append(f"inrun_megatron/{name.group(2)}" if name.group(1) else name.group(2))
    return entries


def test_layouts_name_every_library_module_and_only_existing_paths():
    """README "Repository layout" and docs/DESIGN.md §3 describe the tree as it is."""
    library = {
        f"inrun_megatron/{p.name}/" if p.is_dir() else f"inrun_megatron/{p.name}"
        for p in (REPO / "inrun_megatron").iterdir()
        if p.name != "__init__.py" and not p.name.startswith((".", "__")) and (p.suffix == ".py" or p.is_dir())
    }
    for document in (REPO / "README.md", REPO / "docs" / "DESIGN.md"):
        entries = _layout_entries(document)
        missing = [e for e in entries if not (REPO / e).exists()]
        assert not missing, f"{document.name} names paths that do not exist: {missing}"
        unnamed = library - set(entries)
        assert not unnamed, f"{document.name}'s layout leaves out {sorted(unnamed)}"
