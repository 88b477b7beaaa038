"""The package's shape: no import cycles, stages as peers, modules of one job, docs that match.

The imports are read from the source (``ast``), every ``import`` counted wherever it stands: at
the top, inside a function, or under ``if TYPE_CHECKING:``. A cycle that only type checkers see
still ties two modules together for a reader.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import resilient_cache

PACKAGE_DIR = Path(resilient_cache.__file__).parent
ROOT = PACKAGE_DIR.parent
PACKAGE = "resilient_cache"
MAX_MODULE_LINES = 620  # "none over ~600 lines"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module of the package ``name`` refers to (a name inside a module -> that module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from package import submodule" imports the submodule.
            names = [f"{prefix}.{alias.name}" for alias in node.names] or [prefix]
            names = [n if _resolve(n) != PACKAGE or n == PACKAGE else prefix for n in names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name)
                if target != module:
                    found.add(target)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Every elementary cycle found by a depth-first search, each reported once."""
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    # The package's __init__ re-exports the public API: importing a name from it is how users
    # and examples work, but a module of the package must not depend on it.
    graph = {m: {t for t in targets if t != PACKAGE} for m, targets in GRAPH.items()}

    def visit(node: str, path: list[str], on_path: set[str]) -> None:
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                cycle = [*path[path.index(target) :], target]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    cycles.append(cycle)
                continue
            if len(path) < 12:
                visit(target, [*path, target], on_path | {target})

    for start in sorted(graph):
        if start != PACKAGE:
            visit(start, [start], {start})
    return cycles


def test_the_import_reader_sees_imports() -> None:
    # Guards the test itself: a reader that found nothing would pass everything below.
    assert "resilient_cache.pipeline" in GRAPH["resilient_cache.client"]
    assert "resilient_cache.registry" in GRAPH["resilient_cache.hookspecs"]  # TYPE_CHECKING
    assert "resilient_cache.telemetry" in GRAPH["resilient_cache.stages.retry"]


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_no_package_module_imports_the_public_facade() -> None:
    offenders = [m for m, targets in GRAPH.items() if PACKAGE in targets and m != PACKAGE]
    assert offenders == []


def test_no_stage_imports_another_stage() -> None:
    stages = {m for m in MODULES if m.startswith(f"{PACKAGE}.stages.")}
    crossing = {m: sorted(GRAPH[m] & stages) for m in stages if GRAPH[m] & stages}
    assert crossing == {}


def test_no_stage_reads_another_stages_section() -> None:
    """A stage reads its own section from its factory's argument; ``context.settings.<other>``
    (or ``getattr(settings, "<other>")``) would make it depend on a peer."""
    stage_names = {p.stem for p in (PACKAGE_DIR / "stages").glob("*.py") if p.stem != "__init__"}
    pattern = re.compile(r"settings\.(\w+)|getattr\([\w.]*settings, \"(\w+)\"")
    offenders = []
    for stage in sorted(stage_names):
        text = (PACKAGE_DIR / "stages" / f"{stage}.py").read_text()
        for match in pattern.finditer(text):
            name = match.group(1) or match.group(2)
            if name in stage_names and name != stage:
                offenders.append(f"{stage}: {match.group(0)}")
    assert offenders == []


def test_no_code_compares_backend_names() -> None:
    offenders = [
        f"{module}: {line.strip()}"
        for module, path in MODULES.items()
        for line in path.read_text().splitlines()
        if re.search(r"backend\.name\s*[!=]=", line)
    ]
    assert offenders == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines; split it by job"


def test_architecture_doc_names_every_module_and_no_other() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(resilient_cache(?:/[\w]+)*(?:/|\.py))`", doc))
    files = {str(path.relative_to(ROOT)) for path in PACKAGE_DIR.rglob("*.py")} | {
        str(path.relative_to(ROOT)) + "/" for path in PACKAGE_DIR.rglob("*") if path.is_dir()
    }
    files = {f for f in files if "__pycache__" not in f}
    missing = sorted(f for f in files if f.endswith(".py") and f not in named)
    stale = sorted(f for f in named if f not in files)
    assert missing == [], "modules docs/architecture.md does not describe"
    assert stale == [], "docs/architecture.md names modules that do not exist"


def test_blocking_a_builtin_plugin_does_not_import_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from resilient_cache import create_redis_cluster\n"
        "c = create_redis_cluster('127.0.0.1:7000', autoload=False, health_check_interval=0,\n"
        "    stages=['retry', 'routing'],\n"
        "    plugins_blocked=['resilient_cache.stages.memory', 'resilient_cache.stages.tracing'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('resilient_cache.stages.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert "resilient_cache.stages.retry" in out
    assert "resilient_cache.stages.memory" not in out
    assert "resilient_cache.stages.tracing" not in out


def test_plugin_authors_get_everything_from_the_package() -> None:
    import inspect

    from resilient_cache import errors

    public = set(resilient_cache.__all__)
    error_classes = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value)
        and issubclass(value, errors.ResilientCacheError)
        and value.__module__ == errors.__name__
        and not name.startswith("_")
    }
    assert error_classes - public == set()
    needed = {"BuildContext", "StageRegistry", "BackendRegistry", "Backend", "NodeRef"}
    assert needed | {"hookimpl", "Command", "Handler", "cancel_and_wait", "__version__"} <= public
    assert all(hasattr(resilient_cache, name) for name in public)


def _is_core(module: str) -> bool:
    """``resilient_cache`` or one of its modules (not a plugin such as resilient_cache_chaos)."""
    return module == PACKAGE or module.startswith(PACKAGE + ".")


FIRST_PARTY_PLUGINS = sorted(p.name for p in (ROOT / "plugins").iterdir() if p.is_dir())


def test_the_first_party_plugins_are_all_checked() -> None:
    assert {"slowlog", "chaos", "dualwrite"} <= set(FIRST_PARTY_PLUGINS)


@pytest.mark.parametrize("plugin", FIRST_PARTY_PLUGINS)
def test_the_first_party_plugin_uses_only_the_public_api(plugin: str) -> None:
    package = ROOT / "plugins" / plugin / "src" / f"resilient_cache_{plugin}"
    imported: set[tuple[str | None, str]] = set()
    for source in sorted(package.rglob("*.py")):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _is_core(node.module or ""):
                imported.update((node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):  # import resilient_cache.x: not the public API
                imported.update((alias.name, "") for alias in node.names if _is_core(alias.name))
    assert imported, f"plugin {plugin} imports nothing from resilient_cache?"
    assert {module for module, _ in imported} == {PACKAGE}
    assert all(name and not name.startswith("_") for _, name in imported)
    assert {name for _, name in imported} <= set(resilient_cache.__all__)
