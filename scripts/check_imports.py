"""The import graph of mlc (every import, also those inside functions): no circle, and no module of a package
importing from a package above it in docs/architecture.md's order. Prints the offending edges; exit 1 if any.

    python scripts/check_imports.py
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a module may import from its own layer and the ones before it. A package's commands module
# (`mlc data ...` in mlc.data.commands) belongs to its package; the CLI, which imports them all, is last.
LAYERS = [
    ["mlc.errors", "mlc.task_table", "mlc.runtime", "mlc.kernels"],
    ["mlc.paths"],
    ["mlc.models"],
    ["mlc.recipe", "mlc.layout"],
    ["mlc.data"],
    ["mlc.surgery", "mlc.deploy"],
    ["mlc.distill"],
    ["mlc.evaluate"],
    ["mlc.pipeline"],
    ["mlc.inspect_recipe", "mlc.launcher", "mlc.distill.bench_commands", "mlc.cli"],
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("kernels", "launcher"):  # installed as mlc.kernels, mlc.launcher
        parts = ["mlc"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    if level is None:
        raise SystemExit(f"{name}: not in any layer of scripts/check_imports.py")
    return level


def imports(path: Path, name: str, modules) -> set[str]:
    """The mlc modules ``path`` imports: for ``from a import b``, the module a.b if there is one, else a."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in out if m == "mlc" or m.startswith("mlc.")}


def main() -> int:
    files = [p for d in ("mlc", "kernels", "launcher") for p in (ROOT / d).rglob("*.py")]
    names = {module_name(p): p for p in files}
    graph = {}
    for name, path in names.items():
        deps = set()
        for m in imports(path, name, names):
            while m and m not in names:
                m = m.rsplit(".", 1)[0] if "." in m else ""
            if m and m != name and m != "mlc":
                deps.add(m)
        graph[name] = deps
    bad = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
           for a, deps in sorted(graph.items()) for b in sorted(deps) if layer_of(b) > layer_of(a)]
    # circles: a depth-first search over the module graph
    state, stack, circles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n)
    for line in bad:
        print("upward:", line)
    for c in circles:
        print("circle:", c)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports: {len(bad)} upward, {len(circles)} circles")
    return 1 if bad or circles else 0


if __name__ == "__main__":
    sys.exit(main())
