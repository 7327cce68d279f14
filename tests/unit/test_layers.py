"""The package's layers: each module imports only its own layer and those
below it, and no module imports itself back through others. Layers, lowest
first; a module belongs to the first layer naming it or a package above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pdserve

LAYERS: list[tuple[str, list[str]]] = [
    (
        "basics",
        [
            "pdserve",
            "pdserve.log",
            "pdserve.timing",
            "pdserve.settings",
            "pdserve.identity",
            "pdserve.incompatible",
            "pdserve.kv_layout",
            "pdserve.vllm_compat",
            "pdserve.tiny_model",
        ],
    ),
    (
        "the side channel's wire",
        [
            "pdserve.side_channel",
            "pdserve.side_channel.protocol",
            "pdserve.side_channel.channel",
        ],
    ),
    (
        "what crosses it",
        [
            "pdserve.lease",
            "pdserve.fingerprint",
            "pdserve.kv_cache",
            "pdserve.ticket",
            "pdserve.request_proof",
            "pdserve.pairings",
            "pdserve.side_channel.load_spec",
        ],
    ),
    ("transports", ["pdserve.transport"]),
    (
        "the side channel's ends",
        [
            "pdserve.side_channel.leases",
            "pdserve.side_channel.session_setup",
            "pdserve.side_channel.client",
            "pdserve.side_channel.server",
        ],
    ),
    ("the engine's connector", ["pdserve.connector"]),
    ("the HTTP side", ["pdserve.metrics", "pdserve.frontend"]),
    ("entrypoints", ["pdserve.entrypoints"]),
    ("tools", ["pdserve.local_cluster", "pdserve.demo"]),
]

ROOT = Path(pdserve.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ["pdserve", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """pdserve modules ``name`` imports (lazily too)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in out if m in known and m != name}


def layer_of(module: str) -> int:
    best = None
    for index, (_, names) in enumerate(LAYERS):
        for prefix in names:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} "
        f"({LAYERS[layer_of(dep)][0]})"
        for name, deps in graph().items()
        for dep in deps
        if layer_of(dep) > layer_of(name)
    ]
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_graph_sees_imports_of_every_form():
    edges = graph()
    # "from pdserve.x.y import Z", lazily inside a function, and relative-free
    # "from pdserve.x import module" are all edges.
    assert "pdserve.side_channel.client" in edges["pdserve.connector.producer_peer"]
    assert (
        "pdserve.connector.producer_scheduler"
        in edges["pdserve.connector.scheduler_role"]
    )
    assert "pdserve.side_channel.client" in edges["pdserve.entrypoints.api_server"]
    assert layer_of("pdserve.transport.ipc") < layer_of("pdserve.side_channel.client")


def test_unit_tests_mirror_the_packages():
    """Each package's tests live in the folder of its name, and only those."""
    tests = Path(__file__).parent
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    folders = {p.parent.name for p in tests.glob("*/__init__.py")}
    assert folders == packages
