"""Every test the documentation cites exists: a file path, and the test
function when one is named (``path::name``, possibly wrapped across lines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "deploy/README.md", "benchmarks/RESULTS.md"]
# tests/x/test_y.py, optionally ::name (whitespace after :: is a line wrap).
CITATION = re.compile(r"(tests/[\w/]+\.py)(?:::\s*(\w+))?")
# A bare test file name (deploy/README.md names its own tests this way).
BARE = re.compile(r"(?<![\w/])(test_\w+\.py)")


def citations(doc: str) -> list[tuple[str, str | None]]:
    text = (ROOT / doc).read_text()
    found = [(m[1], m[2]) for m in CITATION.finditer(text)]
    bare = {m[1] for m in BARE.finditer(text)} - {Path(p).name for p, _ in found}
    return found + [(name, None) for name in sorted(bare)]


def test_the_docs_cite_tests():
    assert any(citations(doc) for doc in DOCS)


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_test_exists(doc):
    for path, name in citations(doc):
        if "/" in path:
            files = [ROOT / path]
        else:
            files = list((ROOT / "tests").rglob(path))
        assert files and files[0].is_file(), f"{doc} cites {path}: no such file"
        if name is not None:
            source = files[0].read_text()
            assert re.search(rf"^(async )?def {name}\(", source, re.M), (
                f"{doc} cites {path}::{name}: no such test"
            )
