"""The import graph of the package: kernels <- vllm_dash (the adapter) <- serving / eval,
nothing imports upward, no import circle between modules, and no vLLM import in kernels/
or in the adapter's version-free modules (layout, config). Read from the source (AST), so
imports inside functions count too."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# source folder -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"kernels": "vllm_dash.kernels", "vllm_dash": "vllm_dash",
            "serving": "vllm_dash.serving", "eval": "vllm_dash.eval"}
LAYER = {"vllm_dash.kernels": 0, "vllm_dash": 1, "vllm_dash.serving": 2, "vllm_dash.eval": 2}


def _modules():
    """{module name: (layer package, path)} for every installed module."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((REPO / folder).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            out[name] = (pkg, path)
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set:
    """Absolute names of the modules ``name`` imports (relative imports resolved)."""
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & set(MODULES)
            # `from pkg import module` depends on the module, not on pkg's __init__
            found.update(subs if len(subs) == len(node.names) else subs | {base})
    found.discard(name)
    return {m for m in found if m in MODULES or m.split(".")[0] == "vllm"}


GRAPH = {name: _imports(name, path) for name, (_, path) in MODULES.items()}


def test_the_tree_is_what_this_test_reads():
    for must in ("vllm_dash.kernels.params", "vllm_dash.kernels.reference",
                 "vllm_dash.layout", "vllm_dash.compat", "vllm_dash.backend",
                 "vllm_dash.serving.cli", "vllm_dash.eval"):
        assert must in MODULES, must
    assert "vllm_dash.kernels.params" in GRAPH["vllm_dash.kernels.reference"]
    assert "vllm_dash.layout" in GRAPH["vllm_dash.compat"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nothing_imports_upward(name):
    layer = LAYER[MODULES[name][0]]
    for dep in GRAPH[name]:
        if dep in MODULES:
            assert LAYER[MODULES[dep][0]] <= layer, f"{name} imports {dep} (upward)"
            if layer == 2:      # serving and eval are siblings: eval may use serving's
                assert not (MODULES[name][0] == "vllm_dash.serving"
                            and MODULES[dep][0] == "vllm_dash.eval"
                            and name != "vllm_dash.serving.cli"), \
                    f"{name} imports {dep} (only the CLI dispatches to eval)"


@pytest.mark.parametrize("name", [m for m in sorted(MODULES)
                                  if m.startswith("vllm_dash.kernels")
                                  or m in ("vllm_dash.layout", "vllm_dash.config")])
def test_version_free_modules_do_not_import_vllm(name):
    assert not {d for d in GRAPH[name] if d.split(".")[0] == "vllm"}, name


def test_compat_never_imports_the_backend():
    assert "vllm_dash.backend" not in GRAPH["vllm_dash.compat"]


def test_no_import_circle():
    def visit(node, stack, done):
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if node in done:
            return
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            # a package's __init__ importing its own submodules is not a circle
            if dep in MODULES and not (dep.startswith(node + ".") and
                                       MODULES[node][1].stem == "__init__"):
                visit(dep, stack, done)
        stack.pop()
        done.add(node)

    done = set()
    for name in sorted(MODULES):
        visit(name, [], done)
