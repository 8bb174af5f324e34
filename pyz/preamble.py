"""Run by the pyz (shiv's --preamble) before anything of the gateway is imported: its
compiled dependencies (orjson, msgspec, httptools, uvloop, ...) were built for one
CPython ABI, so any other Python is refused here in one line, not by a traceback."""

from __future__ import annotations

import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path


def abi_tags(names: list[str]) -> set[str]:
    """The version tags of compiled modules, e.g. cpython-311-x86_64-linux-gnu; the
    stable ABI (abi3) and untagged modules load on any CPython and say nothing."""
    tags = set()
    for name in names:
        parts = name.split(".")
        if len(parts) >= 3 and parts[-1] in ("so", "pyd") and parts[-2] != "abi3":
            tags.add(parts[-2])
    return tags


def refusal(tags: set[str], suffixes: list[str], running: str) -> str | None:
    """One line saying which Python the archive needs, or None when this one fits."""
    foreign = sorted(t for t in tags if f".{t}.so" not in suffixes and f".{t}.pyd" not in suffixes)
    if not foreign:
        return None
    needed = " and ".join(describe(t) for t in foreign)
    return (
        f"gateway.pyz was built for {needed} and its compiled dependencies load on no "
        f"other Python; this is {running}: run it with that Python, or build the pyz "
        "with this one (make clean && make pyz PY=this-python)"
    )


def describe(tag: str) -> str:
    """cpython-311-x86_64-linux-gnu -> CPython 3.11 on x86_64-linux-gnu."""
    impl, _, rest = tag.partition("-")
    version, _, platform = rest.partition("-")
    if impl == "cpython" and version.isdigit() and len(version) >= 2:
        shown = f"CPython {version[0]}.{version[1:]}"
        return f"{shown} on {platform}" if platform else shown
    return tag


def running_python() -> str:
    impl = sys.implementation.name
    name = "CPython" if impl == "cpython" else impl
    return f"{name} {sys.version_info[0]}.{sys.version_info[1]} ({sys.executable or 'python'})"


def main(site_packages: Path) -> None:
    names = [p.name for p in site_packages.rglob("*") if p.suffix in (".so", ".pyd")]
    message = refusal(abi_tags(names), EXTENSION_SUFFIXES, running_python())
    if message is not None:
        sys.stderr.write(f"gateway: {message}\n")
        sys.exit(1)


if __name__ == "__main__":
    # shiv passes the extracted site-packages directory as a global.
    main(Path(globals()["site_packages"]))
