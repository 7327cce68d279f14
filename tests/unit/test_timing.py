"""pdserve's fixed durations live in one module, each with its reason."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pdserve.timing

PACKAGE = Path(pdserve.timing.__file__).parent
TIMING = Path(pdserve.timing.__file__)
# A module or class constant whose name says it is a duration (or a wait in
# engine steps).
DURATION = re.compile(r"^_?[A-Z][A-Z0-9_]*(SECONDS|TIMEOUT|_MS|WAIT_STEPS)$")


def constants(tree: ast.Module) -> list[ast.Assign | ast.AnnAssign]:
    """Assignments at module level and in class bodies."""
    bodies = [tree.body] + [
        n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
    ]
    return [
        n for body in bodies for n in body if isinstance(n, ast.Assign | ast.AnnAssign)
    ]


def names(node: ast.Assign | ast.AnnAssign) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def is_number(value: ast.expr | None) -> bool:
    """A literal, arithmetic of literals, float(...) or timedelta(...) (not,
    say, a metric named ..._SECONDS)."""
    if isinstance(value, ast.Call):
        return getattr(value.func, "id", "") in ("float", "timedelta")
    return isinstance(value, ast.Constant | ast.BinOp | ast.UnaryOp)


def test_durations_are_defined_only_in_timing():
    elsewhere = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py")
        if path != TIMING
        for node in constants(ast.parse(path.read_text()))
        for name in names(node)
        if DURATION.match(name) and is_number(node.value)
    ]
    assert elsewhere == []


def test_timing_imports_nothing_from_pdserve():
    tree = ast.parse(TIMING.read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [m for m in imported if m and m.startswith("pdserve")]


def test_every_duration_says_why():
    """Each constant follows a comment (a group of them may share one)."""
    lines = TIMING.read_text().splitlines()
    nodes = constants(ast.parse(TIMING.read_text()))
    assert len(nodes) >= 30
    for node in nodes:
        row = node.lineno - 2  # the line above, 0-based
        while row >= 0 and DURATION.match(lines[row].split(" =")[0].strip()):
            row -= 1  # a group under one comment
        assert lines[row].startswith("#"), names(node)
        assert all(DURATION.match(name) for name in names(node)), names(node)
