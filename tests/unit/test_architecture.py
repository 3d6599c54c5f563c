"""The layout docs/architecture.md describes, kept true: no import cycle between modules of bitcpm_cli (imports inside
functions count), every import goes down the layers, no function over 80 lines, and one registry per extension point.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "bitcpm_cli"

# The layers of bitcpm_cli.core, bottom first: a module may import its own layer's modules and those below.
LAYERS = [
    ["errors"],
    ["io"],
    ["runtime"],
    ["quant"],
    ["model"],
    ["formats"],
    ["conversion"],
    ["engines"],  # above the writers: the vllm engine fuses a QAT checkpoint through conversion/formats.py
    ["training"],
    ["evaluation"],
    ["quickstart"],
]
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The bitcpm_cli modules a module imports, at any depth (inside functions too), but `if TYPE_CHECKING:`."""
    this = module_name(path)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.add(node.module)
            for alias in node.names:  # `from package import module`
                if f"{node.module}.{alias.name}" in known:
                    found.add(f"{node.module}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(this)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_bitcpm_cli():
    found = cycles(import_graph())
    print(f"import cycles: {len(found)}")
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(group) for group in found)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["bitcpm_cli", "core"] or len(parts) < 3:
        return None
    return next(i for i, layer in enumerate(LAYERS) if parts[2] in layer)


def test_every_core_package_has_a_layer():
    packages = {path.name.removesuffix(".py") for path in (PACKAGE / "core").iterdir()
                if path.name != "__init__.py" and path.name != "__pycache__"}
    assert packages == {name for layer in LAYERS for name in layer}


def test_core_imports_go_down_the_layers_and_never_into_the_cli():
    upward = []
    for module, targets in import_graph().items():
        if _layer(module) is None:
            continue
        for target in targets:
            if target.startswith("bitcpm_cli.cli"):
                upward.append(f"{module} -> {target}")
            elif _layer(target) is not None and _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
            elif (_layer(target) == _layer(module) and _layer(module) is not None
                  and target.split(".")[2] != module.split(".")[2]):  # conversion and engines share a layer
                upward.append(f"{module} -> {target} (same layer)")
    assert upward == []


# What other packages may import of `conversion` (the writers) and `engines`: the doors, never a writer's or an
# engine's own module, so that a reader takes a format from the module that owns it (io/, formats/) and a new format
# or engine is reached through its table.
FRONT_DOORS = {"bitcpm_cli.core.conversion.formats", "bitcpm_cli.core.conversion.report",
               "bitcpm_cli.core.engines.registry", "bitcpm_cli.core.engines.base", "bitcpm_cli.core.engines.prompts"}


def test_writers_and_engines_are_reached_only_through_their_front_doors():
    def package(module: str) -> str:
        return ".".join(module.split(".")[:3])

    bad = [f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
           if package(target) in ("bitcpm_cli.core.conversion", "bitcpm_cli.core.engines")
           and package(module) != package(target) and target not in FRONT_DOORS]
    assert bad == []


def test_core_never_imports_typer_prints_or_exits():
    bad = []
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{path.name}: imports {n}" for n in names if n.split(".")[0] in ("typer", "rich", "click")]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "exit"):
                bad.append(f"{path.name}:{node.lineno}: {node.func.id}()")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exit"
                  and isinstance(node.func.value, ast.Name) and node.func.value.id == "sys"):
                bad.append(f"{path.name}:{node.lineno}: sys.exit()")
    assert bad == []


def test_no_function_over_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


@pytest.mark.parametrize("name", ["DTYPES", "describe_runtime", "write_json", "results_document", "read_results",
                                  "rope_parameters", "head_dim", "top_logprobs"])
def test_one_home_for_each_shared_definition(name):
    homes = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                homes.append(module_name(path))
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                homes.append(module_name(path))
    assert len(homes) == 1, homes


def test_every_quant_type_that_quantizes_has_one_quantizer():
    from bitcpm_cli.core.quant.functional import QUANTIZERS
    from bitcpm_cli.core.quant.scheme import QUANT_TYPES

    assert set(QUANTIZERS) == set(QUANT_TYPES) - {"none"}


def test_a_quant_type_added_to_the_table_is_used(monkeypatch):
    import torch

    from bitcpm_cli.core.quant import functional
    from bitcpm_cli.core.quant.scheme import LayerQuant

    def halves(w, abs_w, spec):  # codes of 0.5 steps, scale 0.5 (a test quantizer)
        return torch.round(w * 2), torch.full_like(abs_w[..., :1], 0.5)

    monkeypatch.setitem(functional.QUANTIZERS, "halves", halves)
    weight = torch.tensor([[0.3, -0.8, 1.2, 0.1]])
    fused = functional.fake_quantize(weight, LayerQuant("halves", -1))
    assert torch.equal(fused, torch.tensor([[0.5, -1.0, 1.0, 0.0]]))


def test_modules_take_only_the_version_from_the_package_root():
    """bitcpm_cli/__init__.py resolves the public API lazily by name (importlib, which the cycle test cannot see):
    a module that took an API name from the root would close a cycle through it."""
    taken = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "bitcpm_cli":
                taken |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Import) and any(alias.name == "bitcpm_cli" for alias in node.names):
                taken.add(f"import bitcpm_cli ({path.name})")
    assert taken <= {"__version__"}


def test_layout_report_prints_the_figures():
    """scripts/layout_report.py (the note's figures) on this tree: no cycle, no function over the limit."""
    import subprocess
    import sys

    script = PACKAGE.parent / "scripts" / "layout_report.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "import cycles: 0\n" in done.stdout and f"functions over {MAX_FUNCTION_LINES} lines: 0\n" in done.stdout


def test_hostile_census_counts_the_commands_a_test_runs(tmp_path):
    """scripts/hostile_census.py (the note's hostile-case figures) on a two-test file: one in-process run, one run of
    the installed script, each counted under its command (global options before the command skipped)."""
    import subprocess
    import sys

    (tmp_path / "test_two.py").write_text(
        "from typer.testing import CliRunner\n"
        "from bitcpm_cli.cli.app import app\n"
        "from tests.helpers import bitcpm_script\n"
        "def test_in_process():\n"
        "    assert CliRunner().invoke(app, ['--debug', 'compare', 'missing.json', 'x.json']).exit_code == 2\n"
        "def test_script():\n"
        "    assert bitcpm_script('fix-config', 'nowhere').returncode == 2\n")
    script = PACKAGE.parent / "scripts" / "hostile_census.py"
    import os

    environment = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}  # `tests.helpers` from the test file
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "test_two.py")],
                          capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent, env=environment)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    counts = done.stdout[done.stdout.index("hostile cases by command"):]
    assert "compare           1" in counts and "fix-config        1" in counts and "total             2" in counts
