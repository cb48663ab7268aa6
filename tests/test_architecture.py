"""The package's shape: no import cycles, light lower layers, docs that match the tree.

Import cycles hide behind function-level imports (they work until someone moves an
import to the top of a file, or imports the modules in another order), so the graph
is read from the source with every import counted wherever it sits, and a fresh
interpreter imports every module in a random order.
"""

from __future__ import annotations

import ast
import json
import random
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fedtune"
HEAVY = ("flwr", "peft", "transformers")
#: layer -> the fedtune packages it may import (besides itself)
LAYERS = {
    "fedtune.core": set(),
    "fedtune.aggregation": {"fedtune.core"},
    "fedtune.privacy": {"fedtune.core"},
    "fedtune.config": {"fedtune.core", "fedtune.aggregation", "fedtune.privacy",
                       "fedtune.resources"},
    "fedtune.resources": set(),  # where the bundled files are: a leaf
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _owner(target: str, modules: dict[str, Path]) -> str | None:
    """The module an import statement loads (``from a.b import c``: a.b.c or a.b)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> dict[str, set[str]]:
    """module -> the fedtune modules it imports anywhere in its source (top level,
    inside functions, under TYPE_CHECKING)."""
    modules = module_files()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import; fedtune imports absolutely")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedtune"):
                targets = [_owner(f"{node.module}.{a.name}", modules) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [_owner(a.name, modules) for a in node.names
                           if a.name.split(".")[0] == "fedtune"]
            else:
                continue
            graph[name].update(t for t in targets if t and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(set(graph) | {t for ts in graph.values() for t in ts}):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def _layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lower_layers_import_only_what_is_below_them(layer):
    allowed = LAYERS[layer] | {layer}
    wrong = {f"{m} -> {t}" for m, targets in import_graph().items() if _layer(m) == layer
             for t in targets if _layer(t) not in allowed}
    assert not wrong, f"{layer} may import only {sorted(allowed)}"


LIGHT_CHECK = """
import importlib, json, sys
heavy, out = {heavy!r}, {{}}
for name in {modules!r}:
    importlib.import_module(name)
    loaded = [h for h in heavy if h in sys.modules]
    if loaded:
        out[name] = loaded
        break
print(json.dumps(out))
"""


def test_config_core_aggregation_privacy_import_no_flower_peft_or_transformers():
    modules = [m for m in module_files() if _layer(m) in LAYERS]
    code = LIGHT_CHECK.format(heavy=HEAVY, modules=modules)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first_heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert first_heavy == {}, f"the first module that loads a heavy library: {first_heavy}"


PLANNING = """
import json, sys
from fedtune.config import load_scenario
from fedtune.planning.client_settings import check_ranks_fit_model, client_settings
for source in ("tiny", "smollm2"):
    scenario = load_scenario("server/server.toml", [f"model.source={{source!r}}".replace("'", '"')])
    check_ranks_fit_model(scenario, client_settings(scenario))
print(json.dumps([h for h in {heavy!r} if h in sys.modules]))
"""


def test_planning_a_run_loads_no_model_stack():
    """``fedtune server`` checks every client's rank against the model before it starts
    the SuperLink; that reads the model's dimensions, not the model stack."""
    done = subprocess.run([sys.executable, "-c", PLANNING.format(heavy=("peft",
                                                                        "transformers"))],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


RANDOM_ORDER = """
import importlib, json, sys
import torch
compile_before = torch.compile
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"bitsandbytes": "bitsandbytes" in sys.modules,
                  "inductor": "torch._inductor.compile_fx" in sys.modules,
                  "compile_restored": torch.compile is compile_before}))
"""


def test_every_module_imports_in_a_random_order():
    modules = [m for m in module_files() if not m.endswith("__main__")]
    seed = random.randrange(2**32)
    random.Random(seed).shuffle(modules)
    done = subprocess.run([sys.executable, "-c", RANDOM_ORDER, *modules], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, f"order seed {seed}:\n{done.stderr[-3000:]}"
    # whichever module loads the model stack first, bitsandbytes comes in without
    # TorchInductor (fedtune.model.imports) and torch.compile is Torch's own again
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"bitsandbytes": True, "inductor": False, "compile_restored": True}, \
        f"order seed {seed}: {loaded}"


def documented_packages(text: str) -> set[str]:
    """Every ``fedtune/<package>/`` the architecture document names."""
    return set(re.findall(r"\bfedtune/([a-z_]+)/", text))


def test_architecture_doc_names_every_package_and_only_real_ones():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    named = documented_packages(doc)
    assert named == packages, (f"missing from docs/architecture.md: {sorted(packages - named)}; "
                               f"named there but not in the tree: {sorted(named - packages)}")
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    loose = set(re.findall(r"\bfedtune/([a-z_]+)\.py\b", doc))
    assert loose == modules, (f"top-level modules missing from the doc: {sorted(modules - loose)}; "
                              f"named but absent: {sorted(loose - modules)}")
