"""deptry over code, with the dependency lists read from a ``setup.py``.

deptry reads dependencies from ``pyproject.toml``'s ``[project]`` table or from requirement files,
not from ``setup.py``; the lists are literals there (``install_requires``, ``extras_require``), so
they are read with ``ast`` and handed to deptry as requirement files.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Declared:
    """What a ``setup.py`` declares: the install requirements and each extra's."""

    install: list[str]
    extras: dict[str, list[str]]


def declared(setup_py: Path) -> Declared:
    """The literal ``install_requires`` / ``extras_require`` of ``setup_py``'s ``setup()`` call."""
    lists = {}
    for node in ast.walk(ast.parse(setup_py.read_text())):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            lists[node.arg] = ast.literal_eval(node.value)
    return Declared(lists.get("install_requires", []), lists.get("extras_require", {}))


def run_deptry(project: Path, roots: list[str], runtime: list[str], dev: list[str], workdir: Path,
               extra_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """deptry over ``roots`` (relative to ``project``, where it runs and reads ``pyproject.toml``'s
    ``[tool.deptry]``) with ``runtime`` / ``dev`` requirements (files written to ``workdir``). Its
    report is on standard error."""
    workdir.mkdir(parents=True, exist_ok=True)
    runtime_file, dev_file = workdir / "requirements.txt", workdir / "requirements-dev.txt"
    runtime_file.write_text("\n".join(runtime) + "\n")
    dev_file.write_text("\n".join(dev) + "\n")
    command = [sys.executable, "-m", "deptry", *roots, "--no-ansi",
               "--requirements-files", str(runtime_file), "--requirements-files-dev", str(dev_file),
               *extra_args]
    return subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300)
