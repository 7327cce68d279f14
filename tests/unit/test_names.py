"""One name per thing across pdserve's own code."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from pdserve.lease import Lease
from pdserve.pairings import PairingTarget
from pdserve.protocol import RankInfo
from pdserve.settings import Settings

PACKAGE = Path(__file__).parents[2] / "pdserve"


def sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_public_class_names_are_unique():
    where = defaultdict(list)
    for path, text in sources().items():
        for node in ast.parse(text).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(path)
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_producer_instance_is_instance_id_everywhere():
    for struct in (Settings, RankInfo, Lease, PairingTarget):
        assert "instance_id" in struct.__struct_fields__, struct
    found = [path for path, text in sources().items() if "epoch" in names(text)]
    assert found == []


def names(text: str) -> str:
    """Every identifier and string in ``text`` (comments left out: the
    protocol history tells old names)."""
    words = []
    for node in ast.walk(ast.parse(text)):
        for attr in ("id", "attr", "arg", "name"):
            if isinstance(value := getattr(node, attr, None), str):
                words.append(value)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.append(node.value)
    return " ".join(words)
