"""The package's import graph, read statically: no cycles, the maths core's layers point down, and the core never
reaches a host framework or a host adapter (po_plugins/objective.py pictures the layers).

Every `import` / `from ... import` of every .py under po_plugins/ counts, at module level and inside functions,
classes and `if` blocks alike; relative imports are resolved; `from P import n` is an edge to the module P.n when
that is a module, else to P (so a package's __init__ importing its own submodules is an edge like any other).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "po_plugins"

HOST_FRAMEWORKS = ("openrlhf", "trl", "transformers", "llamafactory", "deepspeed", "accelerate", "peft", "datasets",
                   "vllm", "ray")
HOST_ADAPTERS = ("po_plugins.hosts", "po_plugins.cli")
CORE = ["po_plugins.objective", "po_plugins.losses", "po_plugins.rc", "po_plugins.madpo", "po_plugins.band",
        "po_plugins.scores", "po_plugins.head", "po_plugins.monitor", "po_plugins.options", "po_plugins.errors",
        "po_plugins._dist", "po_plugins.share", "po_plugins.prefix"] + (
            ["po_plugins.plugin"] if (PKG / "plugin.py").exists() else [])
# the maths core's layers, bottom (0) to top: an import between two of these modules must go to a lower layer.
# The package's __init__ sits on top, so no layered module imports it (it re-exports `incentives` from the base).
LAYERS = {
    "po_plugins.errors": 0, "po_plugins._dist": 0, "po_plugins.head": 0, "po_plugins.band": 0, "po_plugins.madpo": 0,
    "po_plugins.prefix": 0,
    "po_plugins.share": 1,  # the pair rows of --po.share_prompt (uses errors)
    "po_plugins.scores": 1,  # head score statistics (uses head)
    "po_plugins.objective": 2,  # base: PairBatch, PairLoss, Diagnostics, incentives
    "po_plugins.rc": 3,  # wrapper: reward calibration (imports only the base)
    "po_plugins.losses": 4,  # catalogue, chosen-NLL wrapper, registry (imports rc)
    "po_plugins.monitor": 5,  # reads an objective through PairLoss.diagnostics
    "po_plugins": 6,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _internal(name: str) -> str | None:
    """The po_plugins module `name` lives in (its longest known prefix), or None outside the package."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in MODULES:
            return ".".join(parts[:k])
    return None


def _edges(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file; internal targets are po_plugins modules,
    external ones the imported name as written."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(_internal(a.name) or a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            if base == "__future__":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else _internal(base) or base, node.lineno))
    return out


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {m: _edges(m, p) for m, p in MODULES.items()}


GRAPH = _graph()


def _where(a: str, b: str) -> str:
    lines = sorted({ln for t, ln in GRAPH[a] if t == b})
    return f"{a} -> {b} ({MODULES[a].relative_to(ROOT)}:{','.join(map(str, lines))})"


def _internal_graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in es if t in MODULES} for m, es in GRAPH.items()}


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component that has one (Tarjan, then a shortest way back)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            comps.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(g) + 100))
    for v in sorted(g):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:
        start = min(comp)
        if len(comp) == 1 and start not in g[start]:
            continue
        prev, frontier = {start: None}, [start]  # BFS inside the component back to `start`
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(g[v] & comp):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, v = [], found
        while v is not None:
            path.append(v)
            v = prev[v]
        cycles.append(path[::-1] + [start])
    return cycles


def _is_host(target: str) -> bool:
    return target.split(".")[0] in HOST_FRAMEWORKS or any(target == h or target.startswith(h + ".")
                                                         for h in HOST_ADAPTERS)


def _host_paths(module: str) -> list[list[str]]:
    """Every way `module` reaches a host framework or adapter through the static graph: the chain of modules and
    the host import at its end (one chain per host target, the shortest)."""
    g = _internal_graph()
    prev, frontier, found = {module: None}, [module], {}
    while frontier:
        nxt = []
        for v in frontier:
            for t, _ in GRAPH[v]:
                if _is_host(t):
                    found.setdefault(t, v)
                elif t in g and t not in prev:
                    prev[t] = v
                    nxt.append(t)
        frontier = nxt
    out = []
    for t, v in sorted(found.items()):
        chain = [t]
        while v is not None:
            chain.append(v)
            v = prev[v]
        out.append(chain[::-1])
    return out


# ---- the graph reader itself --------------------------------------------------------------------------------
def test_the_reader_resolves_relative_and_function_level_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from .. import objective\nfrom ..objective import PairLoss\nfrom .. import incentives\n"
                 "from .base import HostSpec\n"
                 "def f():\n    from ..scores import ScoreStats\n    import trl.trainer\n"
                 "if True:\n    from po_plugins.hosts import trl as t\n")
    targets = sorted(t for t, _ in _edges("po_plugins.hosts.openrlhf", p))
    assert targets == sorted(["po_plugins.objective", "po_plugins.objective", "po_plugins", "po_plugins.hosts.base",
                              "po_plugins.scores", "trl.trainer", "po_plugins.hosts.trl"])
    assert _is_host("trl.trainer") and _is_host("po_plugins.hosts.trl") and _is_host("po_plugins.cli")
    assert not _is_host("po_plugins.trl") and not _is_host("trlx")
    init = tmp_path / "__init__.py"  # an __init__ resolves `.` to its own package
    init.write_text("from .base import X\nfrom . import trl\n")
    assert [t for t, _ in _edges("po_plugins.hosts", init)] == ["po_plugins.hosts.base", "po_plugins.hosts.trl"]


def test_the_cycle_finder_finds_and_reports_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    found = sorted(_cycles(g))
    assert found == [["a", "b", "c", "a"], ["d", "d"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# ---- the package --------------------------------------------------------------------------------------------
def test_no_import_cycle_among_po_plugins_modules():
    cycles = _cycles(_internal_graph())
    report = ["cycle: " + " -> ".join(c) + "\n    " + "\n    ".join(_where(a, b) for a, b in zip(c, c[1:]))
              for c in cycles]
    assert not cycles, "import cycles in po_plugins:\n" + "\n".join(report)


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_host_framework_or_adapter(module):
    assert module in MODULES, f"core module {module} is missing"
    paths = _host_paths(module)
    report = ["  " + " -> ".join(p) + "\n    " + "\n    ".join(
        _where(a, b) if b in MODULES else f"{a} imports {b} "
        f"({MODULES[a].relative_to(ROOT)}:{','.join(str(ln) for t, ln in GRAPH[a] if t == b)})"
        for a, b in zip(p, p[1:])) for p in paths]
    assert not paths, f"{module} reaches host code:\n" + "\n".join(report)


def test_maths_core_imports_point_down_the_layers():
    up = [_where(a, b) + f"  [layer {LAYERS[a]} -> {LAYERS[b]}]" for a in LAYERS for b in sorted(_internal_graph()[a])
          if b in LAYERS and LAYERS[b] >= LAYERS[a]]
    assert not up, "imports that do not point down the maths core's layers:\n  " + "\n  ".join(up)


def test_wrappers_import_only_the_base():
    """RC (and the monitor) never import the catalogue's module or the package's __init__."""
    g = _internal_graph()
    assert "po_plugins.losses" not in g["po_plugins.rc"] and "po_plugins" not in g["po_plugins.rc"]
    assert "po_plugins.losses" not in g["po_plugins.monitor"] and "po_plugins" not in g["po_plugins.monitor"]
    assert g["po_plugins"] == {"po_plugins.objective"}


_PROBE = """
import importlib, json, os, sys
import torch  # loaded once, before the fork: it imports no host framework (checked below)
HOSTS = {hosts!r}
ADAPTERS = {adapters!r}
def bad():
    return sorted(k for k in sys.modules if k.split(".")[0] in HOSTS or k.startswith(ADAPTERS))
out = {{"torch": bad()}}
for name in {modules!r}:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fresh child per module: nothing of po_plugins imported yet
        os.close(r)
        try:
            importlib.import_module(name)
            msg = json.dumps(bad())
        except BaseException as e:
            msg = json.dumps(["import failed: " + repr(e)])
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    out[name] = json.loads(data)
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_importing_a_core_module_loads_no_host_framework():
    """Each core module imported in a fresh process (a fresh interpreter that has loaded torch, forked once per
    module) leaves no host framework and no host adapter in sys.modules."""
    modules = ["po_plugins", *CORE]
    code = _PROBE.format(hosts=HOST_FRAMEWORKS, adapters=tuple(h + "." for h in HOST_ADAPTERS) + HOST_ADAPTERS,
                         modules=modules)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    bad = {m: v for m, v in loaded.items() if v}
    assert not bad, f"host frameworks or adapters loaded by importing: {bad}"
