"""The house plan: modules import downwards only, the math core knows nothing of training, the
world or the course, and every file and function stays a size a reader can hold."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnet"
# the package's own __init__ ("cnet") re-exports the core and must stay inside it too
CORE = {"cnet", "cnet.zero_conv", "cnet.block", "cnet.hint", "cnet.residuals", "cnet.controlnet",
        "cnet.injection", "cnet.convert", "cnet.sample", "cnet.variants"}
UPPER = ("cnet.train", "cnet.world", "cnet.course", "cnet.experiments", "cnet.bench")
MAX_FILE_LINES = 440  # about 400, with a tenth of leeway
MAX_FUNCTION_LINES = 60


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
                cycle = path[path.index(dep):] + [dep] if dep in path else path + [dep]
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
    users = sorted(m for m, deps in GRAPH.items()
                   if not m.startswith("cnet.course") and m != "cnet.__main__"
                   and any(d.startswith("cnet.course") for d in deps))
    assert not users, f"the course layer sits on top, but {users} import it"


# The floors, from the ground up: a module imports only from its own floor and those below.
FLOORS = (
    ("the math core", lambda m: m in CORE),
    ("shared helpers", lambda m: m in {"cnet.settings", "cnet.checkpoints"}),
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
        m for m in MODULES if not any(on(m) for _, on in FLOORS))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_arrow_runs_back_up(module):
    up = sorted(d for d in GRAPH[module] if _floor(d) > _floor(module))
    assert not up, (f"{module} ({FLOORS[_floor(module)][0]}) imports from a higher floor: "
                    + ", ".join(f"{d} ({FLOORS[_floor(d)][0]})" for d in up))


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
                f"{path.name}:{node.lineno} {node.name} is {length} lines")
