"""The package's layers: imports flow one way (read from the source, as ast sees it), and
every module imports alone in a fresh interpreter (no cycle hidden by import order)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"

# Lowest first: a module may import its own rank and the ranks below, never above.
# A layer folder is one name (its modules import each other freely).
RANKS: list[set[str]] = [
    {"types", "errors", "tasks"},  # leaves: no gateway imports at all
    {"wire"},  # pure byte formats
    {"families"},  # the API families as data
    {"config"},  # settings and YAML into frozen objects
    {"server", "upstream", "auth", "health", "strategies", "incoming", "respond"},
    {"reservation", "limits", "body", "plan"},
    {"state", "exchange", "telemetry"},
    {"attempt", "latecommit"},
    {"relay"},
    {"runtime"},
    {"endpoints", "info", "console", "sidecar", "reload", "sockets"},
    {"app"},
    {"cli", "__main__"},
]
LEAVES = RANKS[0]
RANK = {name: i for i, names in enumerate(RANKS) for name in names}


def layer(module: str) -> str:
    """gateway.wire.sse -> wire; gateway.relay -> relay."""
    return module.split(".")[1]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def runtime_imports(path: Path) -> set[str]:
    """The gateway modules a file imports when it runs (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for child in node.body for n in ast.walk(child))
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gateway":
                out.update(f"gateway.{alias.name}" for alias in node.names)
            elif node.module.startswith("gateway."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gateway."))
    return out


def test_every_module_has_a_rank() -> None:
    unranked = {layer(m) for m in modules() if m != "gateway"} - set(RANK)
    assert not unranked, f"give these a rank in RANKS: {sorted(unranked)}"


def test_imports_flow_one_way() -> None:
    wrong = []
    for module, path in modules().items():
        if module == "gateway":
            continue
        mine = layer(module)
        for imported in runtime_imports(path):
            theirs = layer(imported)
            if mine in LEAVES and theirs != mine:
                wrong.append(f"{module} is a leaf but imports {imported}")
            elif RANK[theirs] > RANK[mine]:
                wrong.append(f"{module} ({mine}) imports {imported} ({theirs}), a higher layer")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_top_level_is_the_request_path() -> None:
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= 26, top  # 24 modules with __init__ and __main__


def test_every_module_imports_alone() -> None:
    """Each in a fresh interpreter: an import cycle that works only when another
    module was imported first fails here."""
    names = sorted(m for m in modules() if m != "gateway.__main__")
    code = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'gateway' or m.startswith('gateway.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", out.stdout
