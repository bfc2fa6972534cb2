"""Build an Amaranth component (or Verilog) with Verilator, cached, and run cocotb tests on it.

:func:`run_cocotb` is the one entry point used by the test suite:

1. the component is exported to Verilog (:func:`export_verilog`: explicit ports from the
   component's signature, ``emit_src=False`` so the text is deterministic);
2. the Verilog text and every build option are hashed; the Verilator model is built (through
   ``cocotb_tools.runner``) into ``<build_root>/<toplevel>-<hash12>/`` unless a completed build
   with that hash is already there, in which case it is reused without invoking Verilator/make;
3. the cocotb test module runs in a fresh run directory below the build directory, and the
   xUnit results are parsed into :class:`CocotbResults`. Failing cocotb tests raise
   :class:`AssertionError` naming them (or, with ``expect_failure=True``, *passing* raises:
   negative controls).

Golden data travels through a ``.npz`` file whose path is exported as ``$HARDWIRE_VECTORS``:
:func:`save_vectors` on the pytest side, :func:`load_vectors` inside the cocotb test module.
Progress lines and elapsed times go to stderr.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hardwire.sim.toolchain import ensure_toolchain, tool_versions

__all__ = [
    "VECTORS_ENV", "CocotbResults", "TestCaseResult", "SimulationError", "VerilatorBuild",
    "export_verilog", "build_verilator", "run_cocotb", "parse_results", "save_vectors",
    "load_vectors",
]

#: Environment variable holding the path of the ``.npz`` vector file inside the simulation.
VECTORS_ENV = "HARDWIRE_VECTORS"
#: Bump to invalidate every cached build (changes to how builds are made).
_BUILD_FORMAT = 1
_MARKER = "hardwire-build.json"
_TIMESCALE = ("1ns", "1ps")


class SimulationError(RuntimeError):
    """The simulation could not produce results (crash, timeout, missing results file)."""


def _progress(msg: str) -> None:
    print(f"[hardwire.sim] {msg}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _first_error(log: Path) -> str:
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in lines:
        if line.startswith("%Error") or " error:" in line or line.startswith("make: ***"):
            return line.strip()[:200]
    return ""


# ------------------------------------------------------------------------------------ vectors

def save_vectors(path, **arrays) -> Path:
    """Save named numpy arrays to ``path`` (``np.savez``; ``.npz`` is appended if missing)."""
    import numpy as np

    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{name: np.asarray(value) for name, value in arrays.items()})
    return path


def load_vectors(path=None) -> dict:
    """Load the arrays saved by :func:`save_vectors` (default path: ``$HARDWIRE_VECTORS``)."""
    import numpy as np

    if path is None:
        path = os.environ.get(VECTORS_ENV)
        if not path:
            raise RuntimeError(f"${VECTORS_ENV} is not set: pass vectors= to run_cocotb()")
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


# ---------------------------------------------------------------------------- verilog export

def export_verilog(component, toplevel: str) -> str:
    """Verilog text of an Amaranth component, module name ``toplevel``.

    Ports are taken explicitly from the component's signature (flattened: a stream port ``o``
    becomes ``o__valid``, ``o__ready``, ``o__payload``); ``clk``/``rst`` are added for the
    ``sync`` domain. Source locations are not emitted, so the text (and the build hash) does not
    change when unrelated Python lines move.
    """
    from amaranth.back import verilog
    from amaranth.hdl import Value

    from ..compiler.emit import convert_verilog

    signature = getattr(component, "signature", None)
    if signature is None:
        return verilog.convert(component, name=toplevel, emit_src=False)
    ports = [Value.cast(value) for _path, _member, value in signature.flatten(component)]
    # the same text as verilog.convert, through the fast RTLIL path (compiler/rtlil_fast.py)
    return convert_verilog(component, name=toplevel, ports=ports)


def _verilog_text(component_or_verilog, toplevel: str) -> str:
    if isinstance(component_or_verilog, Path):
        return component_or_verilog.read_text()
    if isinstance(component_or_verilog, str):
        text = component_or_verilog
        if "\n" not in text and text.endswith((".v", ".sv")) and Path(text).is_file():
            return Path(text).read_text()
        if "module" not in text:
            raise ValueError("component_or_verilog: a string must be Verilog text or a .v path")
        return text
    return export_verilog(component_or_verilog, toplevel)


# --------------------------------------------------------------------------------- runner glue

def _runner_class():
    from cocotb_tools.runner import Verilator

    class _Runner(Verilator):
        """cocotb's Verilator runner with: extra PYTHONPATH entries, an environment that wins
        over ``os.environ``, a wall-clock timeout, and CalledProcessError on failures (so
        ``test()`` still parses a results file after a non-zero exit)."""

        def __init__(self) -> None:
            super().__init__()
            self.hw_pythonpath: list[str] = []
            self.hw_env: dict[str, str] = {}
            self.hw_timeout_s: float | None = None
            self.hw_seeded: list[str] = []

        def _set_env_test(self) -> None:
            super()._set_env_test()
            if self.hw_pythonpath:
                self.env["PYTHONPATH"] = os.pathsep.join(
                    [*self.hw_pythonpath, self.env.get("PYTHONPATH", "")])
            self.env.update(self.hw_env)

        def _build_command(self):
            cmds = list(super()._build_command())
            if self.hw_seeded:
                # Seeded runtime objects depend on the Vtop.mk Verilator just rewrote: mark
                # them fresh between the verilator and make steps so make keeps them.
                cmds.insert(1, ["touch", "-c", *self.hw_seeded])
            return cmds

        def _execute_cmds(self, cmds, cwd, stdout=None) -> None:
            for cmd in cmds:
                self.log.info("Running command %s in directory %s", " ".join(cmd), cwd)
                stderr = None if stdout is None else subprocess.STDOUT
                try:
                    result = subprocess.run(cmd, cwd=cwd, env=self.env, check=False,
                                            stdout=stdout, stderr=stderr,
                                            timeout=self.hw_timeout_s)
                except subprocess.TimeoutExpired as exc:
                    raise SimulationError(
                        f"{Path(cmd[0]).name} timed out after {self.hw_timeout_s:g} s") from exc
                if result.returncode != 0:
                    raise subprocess.CalledProcessError(result.returncode, cmd)

    return _Runner


# ----------------------------------------------------------------------------------- building

@dataclass
class VerilatorBuild:
    """A (possibly cached) Verilator model of ``toplevel`` in ``build_dir``."""

    toplevel: str
    build_dir: Path
    digest: str
    cached: bool
    build_s: float
    waves: bool


def _build_options(toplevel, parameters, build_args, waves) -> dict:
    import cocotb_tools.config

    versions = tool_versions()
    return {
        "format": _BUILD_FORMAT,
        "toplevel": toplevel,
        "parameters": {str(k): str(v) for k, v in sorted((parameters or {}).items())},
        "build_args": list(build_args),
        "waves": bool(waves),
        "timescale": list(_TIMESCALE),
        "verilator": versions["verilator"],
        "cocotb": versions["cocotb"],
        "cocotb_libs": str(cocotb_tools.config.libs_dir),
        "cxx": os.environ.get("CXX", "g++"),
        "makeflags": os.environ.get("MAKEFLAGS", ""),
    }


def _cache_home() -> Path:
    """``$HARDWIRE_CACHE_DIR``, else ``$XDG_CACHE_HOME/hardwire``, else ``~/.cache/hardwire``."""
    if os.environ.get("HARDWIRE_CACHE_DIR"):
        return Path(os.environ["HARDWIRE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hardwire"


def _runtime_cache(options: dict) -> Path:
    """Directory for Verilator's design-independent runtime objects (``verilated*.o``).

    They take most of a small model's build time and depend only on the compiler, its flags
    and the Verilator install, all of which are in the key; shared by all build roots.
    """
    key = {k: v for k, v in options.items() if k not in ("toplevel", "parameters")}
    key["verilator_root"] = os.environ.get("VERILATOR_ROOT", "")
    key["cxxflags"] = os.environ.get("CXXFLAGS", "")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return _cache_home() / f"verilated-runtime-{digest[:12]}"


def _seed_runtime(cache: Path, build_dir: Path) -> list[str]:
    if not cache.is_dir():
        return []
    objects = sorted(cache.glob("verilated*.o"))
    for obj in objects:
        shutil.copy2(obj, build_dir / obj.name)
        if obj.with_suffix(".d").is_file():
            shutil.copy2(obj.with_suffix(".d"), build_dir / obj.with_suffix(".d").name)
    return [obj.name for obj in objects]


def _store_runtime(cache: Path, build_dir: Path) -> None:
    if cache.is_dir():
        return
    objects = sorted(build_dir.glob("verilated*.o"))
    if not objects:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    except OSError:
        return  # an unwritable cache only costs build time
    for obj in objects:
        shutil.copy2(obj, tmp / obj.name)
        if obj.with_suffix(".d").is_file():
            shutil.copy2(obj.with_suffix(".d"), tmp / obj.with_suffix(".d").name)
    try:
        tmp.rename(cache)
    except OSError:  # another process stored it first
        shutil.rmtree(tmp, ignore_errors=True)


def _default_build_args() -> list[str]:
    jobs = max(1, min(4, os.cpu_count() or 1))
    return ["-Wno-fatal", "--x-assign", "fast", "--x-initial", "fast", "-O3", "-j", str(jobs)]


def build_verilator(component_or_verilog, *, toplevel: str, build_root, parameters=None,
                    build_args: Sequence[str] = (), waves: bool = False,
                    rebuild: bool = False) -> VerilatorBuild:
    """Build (or reuse) the Verilator model; see :func:`run_cocotb` for the arguments."""
    ensure_toolchain()
    verilog = _verilog_text(component_or_verilog, toplevel)
    args = [*_default_build_args(), *build_args]
    options = _build_options(toplevel, parameters, args, waves)
    hasher = hashlib.sha256(verilog.encode())
    hasher.update(json.dumps(options, sort_keys=True).encode())
    digest = hasher.hexdigest()

    build_root = Path(build_root).absolute()
    build_root.mkdir(parents=True, exist_ok=True)
    build_dir = build_root / f"{toplevel}-{digest[:12]}"
    marker = build_dir / _MARKER
    with open(build_root / f".{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rebuild and marker.is_file() and (build_dir / toplevel).is_file():
            try:
                recorded = json.loads(marker.read_text()).get("digest")
            except (OSError, ValueError):
                recorded = None
            if recorded == digest:
                _progress(f"using cached verilator build of {toplevel}: {build_dir}")
                return VerilatorBuild(toplevel, build_dir, digest, True, 0.0, waves)
        if build_dir.exists():
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True)
        source = build_dir / f"{toplevel}.v"
        source.write_text(verilog)
        log = build_dir / "build.log"
        _progress(f"building {toplevel} (verilator) in {build_dir} ...")
        start = time.monotonic()
        runtime = _runtime_cache(options)
        for use_runtime_cache in (True, False):
            runner = _runner_class()()
            runner.hw_seeded = _seed_runtime(runtime, build_dir) if use_runtime_cache else []
            try:
                runner.build(sources=[source], hdl_toplevel=toplevel, build_dir=build_dir,
                             parameters=dict(parameters or {}), build_args=args,
                             timescale=_TIMESCALE, waves=waves, log_file=log, always=True)
                break
            except (subprocess.CalledProcessError, RuntimeError) as exc:
                if runner.hw_seeded:  # maybe a bad cached runtime object: retry from scratch
                    _progress("build failed with cached runtime objects; retrying without")
                    shutil.rmtree(runtime, ignore_errors=True)
                    for name in runner.hw_seeded:
                        (build_dir / name).unlink(missing_ok=True)
                    continue
                tail = _tail(log)
                if tail:
                    print(tail, file=sys.stderr)
                raise SimulationError(f"verilator build of {toplevel} failed: "
                                      f"{_first_error(log) or exc}; see {log}") from None
        elapsed = time.monotonic() - start
        if not (build_dir / toplevel).is_file():
            raise SimulationError(f"verilator build of {toplevel} produced no executable; "
                                  f"see {log}")
        _store_runtime(runtime, build_dir)
        marker.write_text(json.dumps({"digest": digest, "options": options,
                                      "build_s": round(elapsed, 3)}, indent=1))
        _progress(f"built {toplevel} in {elapsed:.1f} s")
        return VerilatorBuild(toplevel, build_dir, digest, False, elapsed, waves)


# ------------------------------------------------------------------------------------- results

@dataclass
class TestCaseResult:
    """One cocotb test from the xUnit file; ``status``: passed, failed, error or skipped."""

    __test__ = False  # not a pytest class

    name: str
    module: str
    status: str
    message: str = ""
    wall_s: float = 0.0
    sim_time_ns: float | None = None


@dataclass
class CocotbResults:
    """Outcome of :func:`run_cocotb`.

    ``run_dir`` (``results.xml``, ``sim.log``, saved vectors, ``dump.vcd``) is deleted after an
    expected outcome unless ``keep_run_dir`` or ``waves`` was given; ``tests`` holds the parsed
    results either way.
    """

    toplevel: str
    test_module: str
    build: VerilatorBuild
    run_dir: Path
    results_xml: Path
    run_s: float
    tests: list[TestCaseResult] = field(default_factory=list)
    waves_file: Path | None = None

    @property
    def cached(self) -> bool:
        return self.build.cached

    @property
    def passed(self) -> list[str]:
        return [t.name for t in self.tests if t.status == "passed"]

    @property
    def failed(self) -> list[str]:
        return [t.name for t in self.tests if t.status in ("failed", "error")]

    @property
    def skipped(self) -> list[str]:
        return [t.name for t in self.tests if t.status == "skipped"]

    @property
    def ok(self) -> bool:
        return bool(self.passed) and not self.failed

    def summary(self) -> str:
        return (f"{self.test_module} on {self.toplevel}: {len(self.passed)} passed, "
                f"{len(self.failed)} failed, {len(self.skipped)} skipped in {self.run_s:.1f} s")


def parse_results(results_xml) -> list[TestCaseResult]:
    """Parse a cocotb xUnit results file into :class:`TestCaseResult` records."""
    root = ElementTree.parse(results_xml).getroot()
    tests = []
    for case in root.iter("testcase"):
        status, message = "passed", ""
        for kind, label in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(kind)
            if element is not None:
                status, message = label, element.get("message", "") or (element.text or "")
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        sim_ns = props.get("sim_time_duration")
        tests.append(TestCaseResult(
            name=case.get("name", "?"), module=case.get("classname", ""), status=status,
            message=message.strip(), wall_s=float(case.get("time", 0) or 0),
            sim_time_ns=float(sim_ns) if sim_ns not in (None, "") else None))
    return tests


# ------------------------------------------------------------------------------------- running

def run_cocotb(*, component_or_verilog, toplevel: str, test_module: str, test_dir=None,
               build_root, parameters: Mapping | None = None,
               extra_env: Mapping[str, str] | None = None, vectors=None,
               testcase: str | Sequence[str] | None = None, waves: bool = False,
               timeout_s: float | None = None, expect_failure: bool = False,
               build_args: Sequence[str] = (), seed: int | None = None,
               rebuild: bool = False, keep_run_dir: bool = False) -> CocotbResults:
    """Build ``component_or_verilog`` with Verilator (cached) and run cocotb ``test_module``.

    Arguments:
        component_or_verilog: an Amaranth ``wiring.Component`` (exported with
            :func:`export_verilog`), Verilog text, or a ``Path``/``.v`` path.
        toplevel: Verilog module name (also the build directory prefix).
        test_module: importable name of the cocotb test module (comma-separated for several).
        test_dir: directory containing ``test_module``; prepended to the simulation's
            ``PYTHONPATH`` (``sys.path`` of this process is always passed on as well).
        build_root: cache root; the model lives in ``<build_root>/<toplevel>-<hash12>/``.
        parameters: Verilog parameters (part of the build hash).
        extra_env: environment for the simulation (wins over ``os.environ``).
        vectors: path of a ``.npz`` (see :func:`save_vectors`) or a mapping of arrays to save;
            exported to the simulation as ``$HARDWIRE_VECTORS``.
        testcase: run only these cocotb tests (names or comma-separated string).
        waves: build with ``--trace`` and write ``dump.vcd`` in the run directory (kept).
        timeout_s: wall-clock limit for the simulation process.
        expect_failure: negative control: return only if at least one cocotb test failed,
            raise :class:`AssertionError` if all passed.
        build_args: extra Verilator arguments (part of the build hash).
        seed: ``COCOTB_RANDOM_SEED``.
        rebuild: ignore a cached build.
        keep_run_dir: keep the run directory even when the outcome was the expected one.

    Returns :class:`CocotbResults`. Raises :class:`AssertionError` (listing the failing tests
    and their messages) when the outcome is not the expected one, :class:`SimulationError` when
    the simulator crashed, timed out or ran no test, and ``HardwireError`` if the toolchain is
    missing.
    """
    build = build_verilator(component_or_verilog, toplevel=toplevel, build_root=build_root,
                            parameters=parameters, build_args=build_args, waves=waves,
                            rebuild=rebuild)
    runs = build.build_dir / "runs"
    runs.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{test_module.replace(',', '+')}-", dir=runs))
    env = {str(k): str(v) for k, v in (extra_env or {}).items()}
    if vectors is not None:
        if isinstance(vectors, Mapping):
            vectors = save_vectors(run_dir / "vectors.npz", **vectors)
        env[VECTORS_ENV] = str(Path(vectors).absolute())

    runner = _runner_class()()
    if test_dir is not None:
        runner.hw_pythonpath = [str(Path(test_dir).absolute())]
    runner.hw_env = env
    runner.hw_timeout_s = timeout_s
    results_xml = run_dir / "results.xml"
    log = run_dir / "sim.log"
    label = f"{test_module} on {toplevel}" + (" (expecting failure)" if expect_failure else "")
    _progress(f"running {label} ...")
    start = time.monotonic()
    try:
        runner.test(test_module=test_module, hdl_toplevel=toplevel, hdl_toplevel_lang="verilog",
                    build_dir=build.build_dir, test_dir=run_dir, results_xml=str(results_xml),
                    testcase=testcase, seed=seed, waves=waves, timescale=_TIMESCALE,
                    log_file=log, parameters=dict(parameters or {}))
    except SystemExit:
        pass  # the runner exits under pytest when tests fail; the results file decides below
    except SimulationError as exc:
        raise SimulationError(f"{label}: {exc}; see {log}") from None
    run_s = time.monotonic() - start
    if not results_xml.is_file():
        print(_tail(log), file=sys.stderr)
        raise SimulationError(f"{label}: simulation ended without results; see {log}")
    results = CocotbResults(toplevel=toplevel, test_module=test_module, build=build,
                            run_dir=run_dir, results_xml=results_xml, run_s=run_s,
                            tests=parse_results(results_xml),
                            waves_file=run_dir / "dump.vcd" if waves else None)
    _progress(results.summary())
    if not results.tests or not (results.passed or results.failed):
        raise SimulationError(f"{label}: no cocotb test ran (testcase={testcase!r}); see {log}")

    if expect_failure:
        if not results.failed:
            raise AssertionError(f"{label}: expected a cocotb test to fail, but "
                                 f"{', '.join(results.passed)} passed; see {log}")
        _progress(f"negative control failed as expected: {', '.join(results.failed)}")
    elif results.failed:
        print(_tail(log), file=sys.stderr)
        details = "; ".join(f"{t.name}: {t.message.splitlines()[0] if t.message else t.status}"
                            for t in results.tests if t.status in ("failed", "error"))
        raise AssertionError(f"cocotb tests failed in {test_module} on {toplevel}: {details} "
                             f"(log: {log})")
    if not (keep_run_dir or waves):
        shutil.rmtree(run_dir, ignore_errors=True)
    return results
