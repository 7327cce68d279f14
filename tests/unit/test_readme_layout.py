"""README's Layout section names every module of the tree, each where it is,
and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

import pdserve

ROOT = Path(pdserve.__file__).parent
README = ROOT.parent / "README.md"


def layout_block() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Layout") :]
    start = section.index("```\npdserve/") + 4
    return section[start : section.index("```", start)].splitlines()


def named() -> set[str]:
    """Every module the block names, as a path under pdserve/."""
    found: set[str] = set()
    folder = ""
    for line in layout_block()[1:]:
        if line.startswith("  ") and not line.startswith("   "):
            entry = line.split()[0]
            folder = entry if entry.endswith("/") else ""
            if entry == "deploy/":
                break
        for name in re.findall(r"[\w]+\.py\b", line):
            found.add(folder + name)
    return found


def in_tree() -> set[str]:
    return {
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if path.name != "__init__.py" or path.parent == ROOT
    }


def test_layout_names_every_module_where_it_is():
    assert sorted(in_tree() - named()) == []


def test_layout_names_nothing_that_is_not_there():
    assert sorted(named() - in_tree()) == []
