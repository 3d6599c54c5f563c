"""The layout figures of a bitcpm_cli tree: import cycles (the finder of tests/unit/test_architecture.py), the largest
modules and functions, and the size of core/.

    python scripts/layout_report.py            # this checkout
    python scripts/layout_report.py OTHER_DIR  # another tree holding bitcpm_cli/ (e.g. `git archive REV | tar -x`)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.unit import test_architecture as architecture  # noqa: E402


def main(tree: Path) -> None:
    architecture.PACKAGE = tree / "bitcpm_cli"
    found = architecture.cycles(architecture.import_graph())
    print(f"import cycles: {len(found)}")
    for group in found:
        print("  " + " <-> ".join(group))
    files = sorted(architecture.PACKAGE.rglob("*.py"))
    modules = sorted(((len(p.read_text().splitlines()), p.relative_to(tree)) for p in files), reverse=True)
    print("largest modules: " + ", ".join(f"{path} {lines}" for lines, path in modules[:3]))
    functions = sorted(((node.end_lineno - node.lineno + 1, f"{path.relative_to(tree)}:{node.name}")
                        for path in files for node in ast.walk(ast.parse(path.read_text()))
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))), reverse=True)
    print("longest functions: " + ", ".join(f"{name} {lines}" for lines, name in functions[:4]))
    print(f"functions over {architecture.MAX_FUNCTION_LINES} lines: "
          f"{sum(lines > architecture.MAX_FUNCTION_LINES for lines, _ in functions)}")
    core = [p for p in (architecture.PACKAGE / "core").rglob("*.py")]
    print(f"core: {sum(p.name != '__init__.py' for p in core)} modules, "
          f"{sum(len(p.read_text().splitlines()) for p in core)} lines")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
