"""The package's layers, read from its imports with ``ast``: nothing below the trainer imports it,
and the sidecar (which depends on rollout and the build layer only) imports neither train nor evals."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "conspo_jax")


def _modules():
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield os.path.relpath(path, ROOT).replace(os.sep, "/"), path


def _imports(path):
    """Every module a file imports, at the top or inside functions."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _hits(imports, package):
    return sorted(m for m in imports if m == package or m.startswith(package + "."))


MODULES = sorted(_modules())


def test_every_package_directory_is_a_regular_package():
    """``packages = find:`` ships only directories with an __init__.py (a wheel would drop the rest)."""
    for dirpath, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            assert "__init__.py" in files, f"{os.path.relpath(dirpath, ROOT)} has no __init__.py"


@pytest.mark.parametrize("rel,path", MODULES)
def test_only_the_trainer_and_the_cli_import_train(rel, path):
    if rel.startswith("conspo_jax/train/") or rel == "conspo_jax/cli.py":
        return
    assert not _hits(_imports(path), "conspo_jax.train"), f"{rel} imports the trainer"


@pytest.mark.parametrize("rel,path", [m for m in MODULES if m[0].startswith("conspo_jax/sidecar/")])
def test_the_sidecar_imports_neither_train_nor_evals(rel, path):
    imports = _imports(path)
    assert not _hits(imports, "conspo_jax.train") + _hits(imports, "conspo_jax.evals"), rel


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The layer test would pass vacuously if it missed function-level imports."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from conspo_jax.train.step import make_optimizer\n    import conspo_jax.evals\n")
    found = _imports(str(p))
    assert _hits(found, "conspo_jax.train") and _hits(found, "conspo_jax.evals")
