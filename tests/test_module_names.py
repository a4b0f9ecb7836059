"""No top-level folder of the repository shadows another module.

The repository root is the package ``omnidiff``, so its folders are imported as
``omnidiff.<folder>``. But ``python -m ...`` started from the root puts the root first on
``sys.path``, where a folder named like another module would answer a bare ``import <name>``:
Hugging Face's ``kernels`` (which transformers imports), the standard library's ``platform``.
The folders have no ``__init__.py``, so they are namespace portions, which lose to any module
or regular package of the same name found anywhere on ``sys.path``.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = sorted(path.name for path in REPO.iterdir()
                 if path.is_dir() and not path.name.startswith(".") and any(path.rglob("*.py")))


def _shared_names() -> list[str]:
    """Folders named like a standard-library module or an installed distribution's module."""
    installed = importlib.metadata.packages_distributions()
    return [name for name in FOLDERS if name in sys.stdlib_module_names or name in installed]


def _from_the_root(code: str, *extra_path: Path) -> dict:
    """Run ``code`` (which prints one JSON line) with the root first on ``sys.path``, as
    ``python -m`` from the root has it, and ``extra_path`` after site-packages."""
    prelude = (f"import sys, json; sys.path.insert(0, {str(REPO)!r}); "
               f"sys.path.extend({[str(p) for p in extra_path]!r})\n")
    result = subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


_LOCATE = """
import importlib
found = {}
for name in NAMES:
    module = importlib.import_module(name)
    found[name] = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))[0]
print(json.dumps(found))
"""


def test_no_top_level_folder_is_a_regular_package():
    with_init = [folder for folder in FOLDERS if (REPO / folder / "__init__.py").exists()]
    assert not with_init, (f"{with_init}: a top-level folder with __init__.py shadows any module of "
                           "its name when the root is on sys.path; keep it a namespace folder")


def test_names_shared_with_installed_modules_resolve_to_them_from_the_root():
    shared = _shared_names()
    assert "kernels" in shared and "platform" in shared, shared  # the two known today
    found = _from_the_root(f"NAMES = {shared!r}" + _LOCATE)
    shadowed = {name: where for name, where in found.items() if where.startswith(str(REPO) + "/")}
    assert not shadowed, f"top-level folders shadow installed modules: {shadowed}"


def test_a_future_module_named_like_any_folder_is_never_shadowed(tmp_path):
    """Whatever a library imports next: a package named like each other folder, installed after
    the root on sys.path, is the one a bare import finds."""
    names = [name for name in FOLDERS if name not in _shared_names()]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    found = _from_the_root(f"NAMES = {names!r}" + _LOCATE, tmp_path)
    assert found == {name: str(tmp_path / name / "__init__.py") for name in names}


def test_transformers_and_the_train_command_import_from_the_root():
    """What the fresh-machine failure broke: transformers' model classes (through
    ``kernels``) and the train command's imports, with the root first on sys.path. (A whole
    ``python -m omnidiff.platform.cli train`` from the root: ``test_train.py``.)"""
    found = _from_the_root(
        "import transformers.modeling_utils\n"
        "from transformers import AutoModel, Qwen2ForCausalLM\n"
        "import omnidiff.platform.commands.train, omnidiff.platform.trainer\n"
        "import omnidiff.platform.hf_model, omnidiff.platform.evaluation\n"
        "import kernels, platform\n"
        "print(json.dumps({'kernels': kernels.__file__, 'platform': platform.__file__}))\n")
    assert not any(path.startswith(str(REPO) + "/") for path in found.values()), found

