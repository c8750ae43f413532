"""Which package may import which (docs/ARCHITECTURE.md).

Every .py file of the shipped packages is parsed with `ast`; every import counts, at the top of a file or inside a
function, relative ones resolved against the file's package, and `importlib.import_module("...")` with a literal
name too. tests/ is left out: tests import whatever they check (launch, bench included).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("framework", "parallel", "schedules", "launch", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (for `from a import b`: both a and a.b, b may be a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(importer: str, forbidden: tuple[str, ...], exempt: tuple[str, ...] = ()) -> list[str]:
    """'file: module' for every import of a `forbidden` package by a file of package `importer` (not in `exempt`)."""
    out = []
    for path in sorted(ROOT.glob("**/*.py")):
        if path.relative_to(ROOT).parts[0] not in PACKAGES:
            continue
        name = module_name(path)
        if not within(name, importer) or any(within(name, e) for e in exempt):
            continue
        out += [f"{path.relative_to(ROOT)}: {m}" for m in sorted(imported_modules(path))
                if any(within(m, f) for f in forbidden) and not within(m, name)]
    return out


RULES = {
    "schedules -> framework.models": ("schedules", ("framework.models",), ()),
    "parallel -> framework.models": ("parallel", ("framework.models",), ()),
    "framework.fp8 -> framework.models": ("framework.fp8", ("framework.models",), ()),
    "framework.models -> schedules": ("framework.models", ("schedules",), ()),
    "framework, parallel, schedules -> launch, bench": ("", ("launch", "bench"), ("launch", "bench")),
    "launch -> bench": ("launch", ("bench",), ()),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_import_rule(rule):
    importer, forbidden, exempt = RULES[rule]
    if importer:
        found = violations(importer, forbidden, exempt)
    else:
        found = [v for pkg in ("framework", "parallel", "schedules") for v in violations(pkg, forbidden, exempt)]
    assert found == [], f"{rule} is forbidden: " + "; ".join(found)


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    """The parser resolves `from ..models import x` inside a function of framework/fp8/ to framework.models."""
    pkg = tmp_path / "framework" / "fp8"
    pkg.mkdir(parents=True)
    (tmp_path / "framework" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text("def f():\n    from ..models.deepseek_v3 import moe\n    from . import quantize\n"
                                  "    import importlib\n    importlib.import_module('bench.common')\n")
    global ROOT
    ROOT, saved = tmp_path, ROOT
    try:
        found = imported_modules(pkg / "probe.py")
        assert {"framework.models.deepseek_v3", "framework.models.deepseek_v3.moe", "framework.fp8",
                "framework.fp8.quantize", "bench.common"} <= found
        assert violations("framework.fp8", ("framework.models",)) == [
            "framework/fp8/probe.py: framework.models.deepseek_v3",
            "framework/fp8/probe.py: framework.models.deepseek_v3.moe"]
    finally:
        ROOT = saved
