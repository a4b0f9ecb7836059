"""Every third-party module the package and its tests import is declared in ``setup.py``, and
every declared dependency is used: a fresh install gets exactly what the code needs (deptry)."""

from __future__ import annotations

from pathlib import Path

from harness.dependencies import declared, run_deptry

REPO = Path(__file__).resolve().parents[1]
DECLARED = declared(REPO / "setup.py")


def _report(result) -> str:
    return f"deptry exit {result.returncode}:\n{result.stderr}"


def test_the_package_imports_exactly_what_setup_py_declares(tmp_path):
    # runtime: install_requires and the GPU extra (imported where a GPU stack is used);
    # dev: the test extra, which package code must never import
    runtime = DECLARED.install + DECLARED.extras["gpu"]
    result = run_deptry(REPO, ["."], runtime, DECLARED.extras["test"], tmp_path)
    assert result.returncode == 0, _report(result)


def test_the_tests_import_only_declared_packages(tmp_path):
    everything = DECLARED.install + [req for extra in DECLARED.extras.values() for req in extra]
    # the tests use a part of the dependencies: only undeclared or transitive imports count
    result = run_deptry(REPO, ["tests"], everything, [], tmp_path,
                        extra_args=("--exclude", r".*/__pycache__/", "--ignore", "DEP002"))
    assert result.returncode == 0, _report(result)


def test_deptry_reports_an_undeclared_and_an_unused_dependency(tmp_path):
    """The check above can fail: a package importing jiwer (installed here, as it was on the
    machine whose CI stayed green) without declaring it, and declaring pyyaml without using it."""
    package = tmp_path / "src" / "fixture_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import jiwer\nimport torch\n")
    result = run_deptry(tmp_path / "src", ["."], ["torch", "pyyaml"], [], tmp_path / "work")
    assert result.returncode == 1, _report(result)
    assert "DEP003 'jiwer' imported but it is a transitive dependency" in result.stderr, \
        _report(result)
    assert "DEP002 'pyyaml' defined as a dependency but not used" in result.stderr, _report(result)
    assert "torch" not in result.stderr, _report(result)
