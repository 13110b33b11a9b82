"""The import rules stated in the packages' docstrings (``luo_agent/__init__.py`` and the
``__init__`` of ``kernel/``, ``kernel/uapi/``, ``systemd/``, ``dbus/``, ``cli/``, ``examples/``,
``vmm/``, and ``lab/__init__.py``), read from the source with ``ast``."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "luo_agent"
LAB = PACKAGE.parent / "lab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_statements(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Each import of ``path`` anywhere in its body as (module, names), relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [alias.name for alias in node.names]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere in its body, relative imports resolved."""
    found: set[str] = set()
    for base, names in _import_statements(path):
        found.add(base)
        found.update(f"{base}.{name}" for name in names)
    return found


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n == "luo_agent" or n.startswith("luo_agent.")}


def _within(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def test_every_module_was_read() -> None:
    assert "luo_agent.systemd.pystemd_gate" in MODULES
    assert "luo_agent.kernel.session_backend" in MODULES
    assert "luo_agent.pystemd" not in MODULES


def test_only_pystemd_calls_imports_pystemd() -> None:
    """``systemd/__init__.py``: the calls module is the only one (the thread takes pystemd's
    connection class from it)."""
    importers = {
        m for m, names in MODULES.items() if any(n.split(".")[0] == "pystemd" for n in names)
    }
    assert importers == {"luo_agent.systemd.pystemd_calls"}


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        (
            "luo_agent.kernel",
            (
                "luo_agent.kernel",
                "luo_agent.errors",
                "luo_agent.records",
                "luo_agent.persist.write_atomic",
                "luo_agent.fdkind",
            ),
        ),
        ("luo_agent.kernel.uapi", ("luo_agent.kernel.uapi",)),
        ("luo_agent.systemd", ("luo_agent.systemd", "luo_agent.errors")),
        (
            "luo_agent.dbus",
            (
                "luo_agent.dbus",
                "luo_agent.agent",
                "luo_agent.phase",
                "luo_agent.records",
                "luo_agent.errors",
                "luo_agent.config",
                "luo_agent.fdkind.close_fds",
                "luo_agent.__version__",
            ),
        ),
        (
            "luo_agent.cli",
            (
                "luo_agent.cli",
                "luo_agent.client",
                "luo_agent.participant",
                "luo_agent.dbus.names",
                "luo_agent.__version__",
                # liveupdatectl fleet: the coordinator itself, with the agent's [fleet].
                "luo_agent.fleet",
                "luo_agent.config.load_config",
                "luo_agent.errors",
            ),
        ),
        (
            "luo_agent.participant",
            ("luo_agent.client", "luo_agent.dbus.names"),
        ),
        (
            "luo_agent.examples",
            ("luo_agent.client", "luo_agent.participant", "luo_agent.persist.write_atomic"),
        ),
        (
            "luo_agent.vmm",
            (
                "luo_agent.vmm",
                "luo_agent.client",
                "luo_agent.participant",
                "luo_agent.persist.write_atomic",
            ),
        ),
    ],
)
def test_adapter_packages_import_only_what_their_docstring_allows(
    package: str, allowed: tuple[str, ...]
) -> None:
    wrong = {
        (module, name)
        for module, names in MODULES.items()
        if _within(module, (package,))
        for name in _ours(names)
        # "from luo_agent.x import y" records both luo_agent.x and luo_agent.x.y
        if not _within(name, allowed) and not any(a.startswith(name + ".") for a in allowed)
    }
    assert not wrong


def test_nothing_below_the_agent_imports_it_or_the_api_or_the_root() -> None:
    upper = ("luo_agent.agent", "luo_agent.dbus", "luo_agent.daemon")
    lower = (
        "luo_agent.kernel",
        "luo_agent.systemd",
        "luo_agent.phase",
        "luo_agent.registry",
        "luo_agent.persist",
        "luo_agent.sysfs",
        "luo_agent.log",
        "luo_agent.errors",
        "luo_agent.records",
        "luo_agent.config",
        "luo_agent.fdkind",
    )
    wrong = {
        (module, name)
        for module, names in MODULES.items()
        if _within(module, lower)
        for name in _ours(names)
        if _within(name, upper)
    }
    assert not wrong


def test_the_agents_rooms_are_reached_only_through_its_core() -> None:
    """``luo_agent/agent/__init__.py``: the core alone imports the rooms (the start-up room
    writes through the ledger), the shared state imports no room, and no room imports the core."""
    rooms = {"custody", "gates", "ledger", "watchers", "startup"}
    importers: dict[str, set[str]] = {room: set() for room in rooms | {"core"}}
    for module, names in MODULES.items():
        for name in _ours(names):
            target = name.removeprefix("luo_agent.agent.").split(".")[0]
            if name.startswith("luo_agent.agent.") and target in importers:
                importers[target].add(module.removeprefix("luo_agent.agent."))
    package = {"luo_agent.agent"}  # its __init__ re-exports the Agent and its vocabulary
    assert importers["core"] <= package
    for room in rooms - {"ledger"}:
        assert importers[room] <= {"core"} | package, room
    assert importers["ledger"] <= {"core", "startup"}
    assert not {
        n for n in _ours(MODULES["luo_agent.agent.state"]) if n.startswith("luo_agent.agent")
    }


def test_the_daemon_never_imports_the_tools_beside_it() -> None:
    """``luo_agent/__init__.py``: ``cli``, ``client``, ``participant``, ``examples/`` and the test
    rigs stand beside the daemon; nothing the daemon runs imports them."""
    beside = (
        "luo_agent.cli",
        "luo_agent.client",
        "luo_agent.participant",
        "luo_agent.examples",
        "luo_agent.vmm",
        "luo_agent.sandbox",
        "luo_agent.sandbox_cgroups",
        "luo_agent.testbed",
        "luo_agent.demo",
    )
    wrong = {
        (module, name)
        for module, names in MODULES.items()
        if not _within(module, beside) and module not in ("luo_agent", "luo_agent.__main__")
        for name in _ours(names)
        if _within(name, beside)
    }
    assert not wrong


def _edges(path: Path) -> set[str]:
    """The modules of luo_agent that ``path`` imports anywhere (``TYPE_CHECKING`` blocks and
    functions included): ``from x import y`` is an edge to ``x.y`` when that is a module."""
    module = _module_name(path)
    found: set[str] = set()
    for base, names in _import_statements(path):
        if not names:
            found.add(base)
        for name in names:
            found.add(f"{base}.{name}" if f"{base}.{name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def test_no_import_cycle_not_even_for_type_checking() -> None:
    graph = {_module_name(p): _edges(p) for p in sorted(PACKAGE.rglob("*.py"))}
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append([*path[path.index(node) :], node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


# ------------------------------------------------------------------------------ lab/

IN_VM = "lab.in_vm"
PROJECT = ("luo_agent", "tests")
# The inline Python a lab module writes into the VM's shell (``"$PY" -c '...'``) imports too.
INLINE_IMPORT = re.compile(
    r"\bfrom\s+((?:luo_agent|tests)[\w.]*)\s+import\b|\bimport\s+((?:luo_agent|tests)[\w.]*)"
)


def _outside_functions(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``tree`` that run when the module is imported (not those in a function)."""
    for node in ast.iter_child_nodes(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield node
            yield from _outside_functions(node)


def _project_imports(module: str, source: str) -> list[str]:
    """What a module of lab/ imports of the project and may not: ``lab.in_vm`` only inside its
    commands (the host side imports ``probe`` from it and must not load the project), any other
    module nothing, not even in the shell text it writes."""
    tree = ast.parse(source)
    nodes = _outside_functions(tree) if module == IN_VM else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append(node.module or "")
        elif module != IN_VM and isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [m.group(1) or m.group(2) for m in INLINE_IMPORT.finditer(node.value)]
    return [name for name in found if name.split(".")[0] in PROJECT]


LAB_MODULES = {_module_name(p): p.read_text() for p in sorted(LAB.glob("*.py"))}


def test_only_the_labs_in_vm_module_imports_the_project() -> None:
    """``lab/__init__.py``: ``lab/in_vm.py`` alone imports ``luo_agent`` or ``tests``, inside the
    commands that run in the VM; and ``luo_agent`` never imports ``lab``."""
    assert IN_VM in LAB_MODULES and "lab.liveupdate" in LAB_MODULES
    wrong = {m: found for m, text in LAB_MODULES.items() if (found := _project_imports(m, text))}
    assert not wrong
    assert not {m for m, names in MODULES.items() if any(n.split(".")[0] == "lab" for n in names)}


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("lab.vm", "from luo_agent.kernel.syscalls import RealSyscalls\n"),
        ("lab.vm", "def f() -> None:\n    from tests.kernel import luo_raw\n"),
        ("lab.vm", "import luo_agent.fleet as fleet\n"),
        ("lab.vm", 'JOB = """"$PY" -c \'from luo_agent.fleet import x; print(x)\'"""\n'),
        ("lab.vm", "JOB = f\"{1}$PY -c 'import tests.kernel'\"\n"),
        (IN_VM, "from luo_agent.kernel.syscalls import RealSyscalls\n"),
    ],
)
def test_the_lab_rule_sees_a_planted_import(module: str, source: str) -> None:
    assert _project_imports(module, source)


def test_the_lab_rule_lets_the_in_vm_commands_import_the_project() -> None:
    source = "def f() -> None:\n    from luo_agent.kernel.syscalls import RealSyscalls\n"
    assert not _project_imports(IN_VM, source)
    assert not _project_imports("lab.vm", '"imports nothing from ``luo_agent``; -m luo_agent"')
