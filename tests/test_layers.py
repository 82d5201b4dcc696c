"""The package's layers, read from its imports with ``ast``.

Every import counts: at the top of a module or inside a function (a function-level import runs later,
but it is still a dependency, and hiding one inside a function is how circles come back), and the
package ``__init__`` that importing a submodule runs on the way. The rules:

- each sub-package sits on a floor (``FLOORS``) and imports only from lower floors or from itself, so
  no two packages can import each other;
- no circle between modules (``test_no_module_imports_itself_through_others``);
- nothing below the trainer imports ``conspo_jax.train``; the sidecar (the server) imports neither
  ``train`` nor ``evals``; ``conspo_jax.base`` imports nothing else of the package.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "conspo_jax")

# Floor of each top-level room of conspo_jax; a module may import rooms on lower floors and its own.
FLOORS = {
    "base": 0,  # configs, distributed, xla_cache, logs: imports nothing else of conspo_jax
    "models": 1,
    "rewards": 1,
    "objectives": 1,
    "data": 2,
    "rollout": 2,  # the engines, the sidecar client, the wire protocol
    "run": 3,  # validation and build: a config -> a run's objects
    "evals": 4,
    "sidecar": 4,  # the server alone
    "sweep": 4,  # studies: launches `conspo train` as subprocesses, never imports it
    "train": 5,
    "profiling": 6,  # the profile command builds a Trainer
    "cli": 7,
    "__main__": 8,
}


def _module_name(path, root=ROOT):
    rel = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def _modules():
    for dirpath, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield os.path.relpath(path, ROOT).replace(os.sep, "/"), path


MODULES = sorted(_modules())
NAMES = {_module_name(path) for _, path in MODULES}


def _imports(path):
    """Every module name a file imports, at the top or inside functions (``from a import b`` gives a
    and a.b: b may be a submodule)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _resolve(name, known):
    """The module of conspo_jax that importing ``name`` loads last (a name inside it resolves to it)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _graph(modules, root=ROOT):
    """{module: modules it imports}: each import's module and the package __init__s Python runs on the way
    to it, leaving out the importer's own packages (they are already importing when it runs)."""
    known = {_module_name(path, root) for _, path in modules}
    graph = {}
    for _, path in modules:
        me = _module_name(path, root)
        mine = {me.rsplit(".", k)[0] for k in range(me.count(".") + 1)}
        edges = set()
        for name in _imports(path):
            target = _resolve(name, known)
            if target is None or not target.startswith("conspo_jax"):
                continue
            parts = target.split(".")
            edges.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
        graph[me] = {m for m in edges if m in known and m not in mine}
    return graph


def _cycle(graph):
    """One import circle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _room(module):
    return module.split(".")[1] if module.count(".") else "__init__"


def _hits(imports, package):
    return sorted(m for m in imports if m == package or m.startswith(package + "."))


GRAPH = _graph(MODULES)


def test_every_package_directory_is_a_regular_package():
    """``packages = find:`` ships only directories with an __init__.py (a wheel would drop the rest)."""
    for dirpath, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            assert "__init__.py" in files, f"{os.path.relpath(dirpath, ROOT)} has no __init__.py"


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in NAMES} - {"__init__"}
    assert rooms == set(FLOORS), (
        f"rooms without a floor: {rooms - set(FLOORS)}; floors without a room: {set(FLOORS) - rooms}"
    )


def test_no_module_imports_itself_through_others():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("rel,path", MODULES)
def test_imports_go_down_the_floors(rel, path):
    me = _module_name(path)
    if me == "conspo_jax":
        return
    room = _room(me)
    up = sorted(m for m in GRAPH[me] if _room(m) != room and FLOORS.get(_room(m), -1) >= FLOORS[room])
    assert not up, f"{rel} (floor {FLOORS[room]}, {room}) imports {up}, on the same floor or above"


@pytest.mark.parametrize("rel,path", MODULES)
def test_nothing_below_the_trainer_imports_it(rel, path):
    room = _room(_module_name(path))
    if room in FLOORS and FLOORS[room] > FLOORS["train"] or room == "train":
        return
    assert not _hits(_imports(path), "conspo_jax.train"), f"{rel} imports the trainer"


@pytest.mark.parametrize("rel,path", [m for m in MODULES if m[0].startswith("conspo_jax/sidecar/")])
def test_the_sidecar_imports_neither_train_nor_evals(rel, path):
    imports = _imports(path)
    assert not _hits(imports, "conspo_jax.train") + _hits(imports, "conspo_jax.evals"), rel


@pytest.mark.parametrize("rel,path", [m for m in MODULES if m[0].startswith("conspo_jax/base/")])
def test_the_base_floor_imports_nothing_else_of_the_package(rel, path):
    others = [m for m in _hits(_imports(path), "conspo_jax") if not m.startswith("conspo_jax.base")]
    assert not others, f"{rel} imports {others}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The layer tests would pass vacuously if they missed function-level imports."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from conspo_jax.train.step import make_optimizer\n    import conspo_jax.evals\n")
    found = _imports(str(p))
    assert _hits(found, "conspo_jax.train") and _hits(found, "conspo_jax.evals")


def test_the_cycle_check_finds_a_circle_through_a_function_level_import(tmp_path):
    """A planted circle (one side imported inside a function) is found, so the real check is not vacuous."""
    pkg = tmp_path / "conspo_jax"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from conspo_jax.a import y\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from conspo_jax.a.x import g\n")
    planted = [(str(p.relative_to(tmp_path)), str(p)) for p in sorted(pkg.rglob("*.py"))]
    cycle = _cycle(_graph(planted, root=str(tmp_path)))
    assert cycle is not None and set(cycle) == {"conspo_jax.a.x", "conspo_jax.a.y"}, cycle
