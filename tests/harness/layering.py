"""The folder layering check: every ``omnidiff.<folder>`` import, module-level or deferred, must
point at the same folder or one below it in the stack the README's layout table states."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "omnidiff"
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`(\w+)/`\s*\|")


def layers_from_readme(readme: Path) -> list[str]:
    """Folders of the README's layout table, bottom floor first (rows ``| n | `folder/` | ...``)."""
    rows = [_ROW.match(line) for line in readme.read_text().splitlines()]
    floors = sorted((int(m.group(1)), m.group(2)) for m in rows if m)
    return [folder for _, folder in floors]


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    importer: str
    imported: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer}/ imports {self.imported}/ (a higher floor)"


def _imported_folders(tree: ast.AST, own: str):
    """``(line, folder)`` for every omnidiff folder a module imports, deferred ones included."""
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the importing folder
                names = [f"{PACKAGE}.{own}"]
            elif node.module == PACKAGE:
                names = [f"{PACKAGE}.{alias.name}" for alias in node.names]
            elif node.module:
                names = [node.module]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in
              ("import_module", "__import__")):
            names = [node.args[0].value]
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1:
                yield node.lineno, parts[1]


def check_layering(root: Path, layers: list[str]) -> list[Violation]:
    """Every upward import in the folders ``layers`` (bottom first) under ``root``."""
    floor = {folder: index for index, folder in enumerate(layers)}
    violations = []
    for folder in layers:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, imported in _imported_folders(tree, folder):
                if imported in floor and floor[imported] > floor[folder]:
                    violations.append(Violation(str(path.relative_to(root)), line, folder,
                                                imported))
    return violations
