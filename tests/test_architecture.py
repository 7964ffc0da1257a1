"""The package's shape: no import cycles between its modules, thin recipes, one error family."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "grpo_utils"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any level, function-level imports included)."""
    mods = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grpo_utils"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("grpo_utils")}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "grpo_utils.train.loop" in graph and graph["grpo_utils.train.loop"]  # the scan sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # and would see one


def test_recipes_are_thin():
    for recipe in ("grpo-sync.py", "grpo-async.py", "grpo-eval.py"):
        assert len((REPO / "sota-implementations" / "grpo" / recipe).read_text().splitlines()) < 80, recipe


def test_only_the_edge_exits():
    """Library code raises; ``sys.exit`` appears only at the edges (launch.py, the rewards CLI and
    the entry point of the trainer ranks after rank 0)."""
    exits = sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if re.search(r"\bsys\.exit\(", p.read_text()))
    assert exits == ["grpo_utils/distributed/join.py", "grpo_utils/launch.py", "grpo_utils/rewards/__main__.py"]
