"""The house plan: modules import downwards only, the math core knows nothing of training, the
world or the course, and every file and function stays a size a reader can hold."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cnet"
# the package's own __init__ ("cnet") re-exports the core and must stay inside it too
CORE = {
    "cnet",
    "cnet.zero_conv",
    "cnet.block",
    "cnet.hint",
    "cnet.residuals",
    "cnet.controlnet",
    "cnet.injection",
    "cnet.adapter",
    "cnet.controlnet_xs",
    "cnet.concat",
    "cnet.convert",
    "cnet.sample",
    "cnet.variants",
}
UPPER = ("cnet.train", "cnet.world", "cnet.course", "cnet.experiments", "cnet.bench")
# A guide, not a target: most modules hold about 400 formatted lines; past 600, a file is split
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80  # formatted; a longer one says why above its def


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """The cnet modules ``module`` imports, wherever in the file the import stands (a function-
    level import is still a dependency)."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_the_graph_is_read():
    assert GRAPH["cnet.injection"] >= {"cnet.controlnet", "cnet.block"}
    assert "cnet.controlnet" in GRAPH["cnet.convert"]


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(GRAPH[module]):
            # a package's __init__ re-exporting its own submodules is not a dependency on them
            if dep.startswith(module + "."):
                continue
            if state.get(dep) == "open":
                cycle = path[path.index(dep) :] + [dep] if dep in path else path + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_math_core_imports_no_upper_layer(module):
    upper = sorted(d for d in GRAPH[module] if d.startswith(UPPER))
    assert not upper, f"{module} imports {upper}"


def test_convert_imports_the_model_and_is_never_imported_by_it():
    assert "cnet.controlnet" in GRAPH["cnet.convert"]
    assert "cnet.convert" not in GRAPH["cnet.controlnet"]


def test_only_the_command_line_uses_the_course_layer():
    users = sorted(
        m
        for m, deps in GRAPH.items()
        if not m.startswith("cnet.course")
        and m != "cnet.__main__"
        and any(d.startswith("cnet.course") for d in deps)
    )
    assert not users, f"the course layer sits on top, but {users} import it"


SHARED = {"cnet.settings", "cnet.checkpoints", "cnet.averaging", "cnet.processes"}
# The floors, from the ground up: a module imports only from its own floor and those below.
FLOORS = (
    ("the math core", lambda m: m in CORE),
    ("shared helpers", lambda m: m in SHARED),
    ("the world", lambda m: m.startswith("cnet.world")),
    ("the trainer", lambda m: m.startswith("cnet.train")),
    ("the experiments", lambda m: m.startswith("cnet.experiments")),
    ("bench", lambda m: m.startswith("cnet.bench")),
    ("the course", lambda m: m.startswith("cnet.course")),
    ("the command line", lambda m: m == "cnet.__main__"),
)


def _floor(module: str) -> int:
    return next(i for i, (_, on) in enumerate(FLOORS) if on(module))


def test_every_module_stands_on_a_floor():
    assert all(any(on(m) for _, on in FLOORS) for m in MODULES), sorted(
        m for m in MODULES if not any(on(m) for _, on in FLOORS)
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_arrow_runs_back_up(module):
    up = sorted(d for d in GRAPH[module] if _floor(d) > _floor(module))
    assert not up, (
        f"{module} ({FLOORS[_floor(module)][0]}) imports from a higher floor: "
        + ", ".join(f"{d} ({FLOORS[_floor(d)][0]})" for d in up)
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_and_functions_a_reader_can_hold(module):
    path = MODULES[module]
    source = path.read_text()
    assert source.count("\n") <= MAX_FILE_LINES, f"{path.name}: {source.count(chr(10))} lines"
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            # a longer function says why on the line above its def ("# long: ...")
            reason = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
            if node.decorator_list:
                reason = lines[node.decorator_list[0].lineno - 2].strip()
            assert length <= MAX_FUNCTION_LINES or reason.startswith("# long:"), (
                f"{path.name}:{node.lineno} {node.name} is {length} lines"
            )


# ------------------------------------------------------------------------- the settings' route


def settings_route(argv: list[str]) -> list[tuple[str, str, str]]:
    """Every call of a cnet function that receives a run's settings (a :class:`TrainConfig`, or
    an object holding one as ``.config``) while ``python -m cnet`` runs ``argv``, in order:
    (module, function, the calling module)."""
    import sys

    from cnet.__main__ import main
    from cnet.train.config import TrainConfig

    route = []

    def carries(value) -> bool:
        return isinstance(value, TrainConfig) or (
            type(value).__module__.startswith("cnet.")
            and isinstance(getattr(value, "config", None), TrainConfig)
        )

    def watch(frame, event, _):
        module = frame.f_globals.get("__name__", "")
        if event != "call" or not module.startswith("cnet"):
            return
        code = frame.f_code
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        # a dataclass's generated __init__ is no code of cnet's: a class handed down is built
        if code.co_filename.startswith("<") or "__create_fn__" in code.co_qualname:
            return
        if any(carries(frame.f_locals.get(n)) for n in names):
            caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
            route.append((module, code.co_qualname, caller))

    sys.setprofile(watch)
    try:
        main(argv)
    finally:
        sys.setprofile(None)
    return route


@pytest.mark.slow
def test_the_training_settings_reach_the_step_downwards(base, tmp_path):
    """``python -m cnet train``'s settings, followed from the command line to the step of a
    one-step run: no call runs back up a floor, and the stops (a module entered, counted again
    when re-entered) are few. ``pytest tests/project/test_layout.py -k downwards -s`` prints
    the route."""
    route = settings_route(
        [
            "train",
            "--base",
            str(base),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--batch_size",
            "2",
            "--train_size",
            "4",
            "--eval_size",
            "2",
            "--eval_steps",
            "1",
            "--log_every",
            "1",
        ]
    )
    stops = [m for i, (m, _, _) in enumerate(route) if i == 0 or route[i - 1][0] != m]
    up = [(m, f, c) for m, f, c in route if c.startswith("cnet") and _floor(m) > _floor(c)]
    print(f"\n{len(stops)} stops in {len(set(stops))} modules, {len(up)} calls back up:")
    print(" -> ".join(m.removeprefix("cnet.") for m in stops))
    assert not up, f"calls from a lower floor to a higher one: {up}"
    assert any(f == "Trainer.step" for _, f, _ in route)
    # measured: 15 (the settings module twice: the command line checks them, so does Trainer)
    assert len(stops) <= 15


def test_the_tree_is_formatted_and_linted():
    """``ruff format`` and ``ruff check`` (pyproject.toml's settings) have nothing to change in
    the library, the tests and the scripts: the README's test command checks the style too."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    root = PACKAGE.parent
    paths = ["cnet", "tests", "scripts", "conftest.py"]
    for command in (["format", "--check"], ["check"]):
        done = subprocess.run([ruff, *command, *paths], cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout}{done.stderr}"
