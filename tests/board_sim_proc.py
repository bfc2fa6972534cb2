"""Start ``hardwire board-sim`` in the background for a test and hand back its pty."""

import contextlib
import select
import subprocess
import sys
import time

import pytest


@contextlib.contextmanager
def running_board_sim(model, *args, build_dir, start_timeout=900):
    """Run ``hardwire board-sim MODEL ARGS --build-dir BUILD_DIR`` until the block exits and
    yield the pseudo-terminal path it prints on its first line. ``start_timeout`` covers a
    first run, which builds the Verilator model. Fails the test with the tool's stderr if it
    does not start."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hardwire", "board-sim", str(model), *map(str, args),
         "--build-dir", str(build_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + start_timeout
        port = None
        while port is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 5)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break
                port = line.strip()
            if proc.poll() is not None:
                break
        if port is None:
            proc.kill()
            pytest.fail(f"board-sim did not start: {proc.stderr.read()[-2000:]}")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
