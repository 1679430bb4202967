"""The house rules of ``pixelray/``, read from the code itself (``ast``), so a change that breaks one fails here.

- at most 8 modules directly under ``pixelray/``: the folders are the stages of the flow;
- each stage imports only itself and earlier stages (no cycles between stages, nothing runs back up):
  the numerics (``core``, ``attacks``) import neither Ray nor any later stage, nothing below the CLI
  imports ``pixelray.cli``;
- no function over 80 lines;
- no module imports another module's private (``_name``) names.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "pixelray"

# stage -> rank; a module may import its own stage and any stage of a lower rank
STAGES = {
    "core": 0, "attacks": 1, "errors": 0, "cpu_memory": 0, "telemetry": 0, "perturb": 1, "spec": 1,
    "store": 2, "shards": 3, "datasets": 4, "models": 3,
    "config": 5, "engine": 6, "sweep": 7, "train": 7, "report": 8, "cli": 9, "__main__": 10, "__init__": 0,
}
NUMERICS = ("core", "attacks")
MAX_LINES = 80


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


def _stage(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST):
    """(module, names, lineno) for every import, at any depth (lazy imports inside functions count)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node.lineno


def test_at_most_eight_modules_directly_under_the_package():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 8, top


def test_every_stage_is_known():
    assert {_stage(p) for p in _modules()} <= set(STAGES), "a new folder: give it a rank in STAGES"


def test_stages_import_only_earlier_stages_and_the_numerics_import_no_ray():
    bad = []
    for path in _modules():
        stage = _stage(path)
        tree = ast.parse(path.read_text())
        for module, names, line in _imports(tree):
            where = f"{path.relative_to(PKG.parent)}:{line}"
            if stage in NUMERICS and module.split(".")[0] in ("ray", "pyarrow", "pandas"):
                bad.append(f"{where}: the numerics import {module}")
            if module == "pixelray":
                targets = [n for n in names if n != "__version__"]
            elif module.startswith("pixelray."):
                targets = [module.split(".")[1]]
            else:
                continue
            for target in targets:
                if target in STAGES and STAGES[target] > STAGES[stage]:
                    bad.append(f"{where}: {stage} (rank {STAGES[stage]}) imports later stage {target}")
    assert not bad, "\n".join(bad)


def test_no_function_over_80_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_no_module_imports_private_names_of_another():
    bad = []
    for path in _modules():
        me = _module_name(path)
        for module, names, line in _imports(ast.parse(path.read_text())):
            if not module.startswith("pixelray") or module == me:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} from {module} import {', '.join(private)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("rule", ["stages", "private"])
def test_the_rules_catch_what_they_name(rule, tmp_path, monkeypatch):
    """Each rule fails on a planted violation (so the checks above can fail)."""
    fake = tmp_path / "pixelray"
    (fake / "core").mkdir(parents=True)
    src = {"stages": "import ray\nfrom pixelray.sweep import driver\n",
           "private": "from pixelray.core.draws import _hash\n"}[rule]
    (fake / "core" / "bad.py").write_text(src)
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    check = {"stages": test_stages_import_only_earlier_stages_and_the_numerics_import_no_ray,
             "private": test_no_module_imports_private_names_of_another}[rule]
    with pytest.raises(AssertionError):
        check()
