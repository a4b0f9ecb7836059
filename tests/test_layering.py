"""The floor plan stays true: the top-level folders form a one-way stack (README layout table)."""

import shutil
from pathlib import Path

from harness.layering import check_layering, layers_from_readme

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "data", "parallel", "monitoring", "jobs", "k8s", "platform")


def test_readme_table_lists_every_folder_once():
    layers = layers_from_readme(REPO / "README.md")
    assert sorted(layers) == sorted(FOLDERS), layers


def test_no_folder_imports_a_higher_one():
    violations = check_layering(REPO, layers_from_readme(REPO / "README.md"))
    assert not violations, "\n".join(map(str, violations))


def test_an_upward_import_is_caught_even_when_deferred(tmp_path):
    layers = layers_from_readme(REPO / "README.md")
    for folder in layers:
        shutil.copytree(REPO / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.wav"))
    assert check_layering(tmp_path, layers) == []
    (tmp_path / "kernels" / "rope.py").write_text(
        (REPO / "kernels" / "rope.py").read_text()
        + "\n\ndef _late():\n    from omnidiff.platform import trainer  # noqa\n")
    (tmp_path / "data" / "extra.py").write_text(
        "import importlib\nimportlib.import_module('omnidiff.parallel.model')\n"
        "from omnidiff import monitoring\n")
    found = {(v.path, v.importer, v.imported) for v in check_layering(tmp_path, layers)}
    assert found == {("kernels/rope.py", "kernels", "platform"),
                     ("data/extra.py", "data", "parallel"),
                     ("data/extra.py", "data", "monitoring")}
