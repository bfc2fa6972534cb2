"""Golden-model data for hardware testbenches: real stories260K tensors and random models.

Block tests take their "real" inputs from a golden-model trace of stories260K (the same integer
tensors the chip sees), and their "random" inputs from seeded generators. Everything is cached
per test session.
"""

import functools
import os
from pathlib import Path

import numpy as np

from hardwire.compiler.golden import GoldenModel
from hardwire.compiler.loaders import load_model
from hardwire.compiler.quantize import quantize_model

REPO = Path(__file__).resolve().parents[1]


def models_dir():
    """The real models: $HARDWIRE_MODELS, else ./models, else ../shared/models."""
    env = os.environ.get("HARDWIRE_MODELS")
    cands = [Path(env)] if env else [REPO / "models", REPO.parent / "shared" / "models"]
    for c in cands:
        if (c / "stories260K.bin").is_file():
            return c
    raise FileNotFoundError(
        f"stories260K.bin not found in {', '.join(map(str, cands))}: run `make models` "
        "or set HARDWIRE_MODELS")


@functools.lru_cache(maxsize=None)
def stories_model():
    return load_model(models_dir() / "stories260K.bin")


@functools.lru_cache(maxsize=None)
def stories_qmodel(wbits=8):
    return quantize_model(stories_model(), wbits=wbits)




@functools.lru_cache(maxsize=None)
def stories_trace(n_tokens=12, wbits=8):
    """Golden traces of stories260K for the first ``n_tokens`` positions of a fixed sequence.

    Returns a list of dicts (one per position) of integer tensors by trace name; the KV state
    is the golden model's own. Tokens come from the golden model's greedy run from BOS.
    """
    qm = stories_qmodel(wbits)
    g = GoldenModel(qm)
    traces = []
    tok = 1
    for pos in range(n_tokens):
        t = {"token": tok, "pos": pos}
        g.step(tok, pos, trace=t)
        traces.append(t)
        tok = t["next_token"]
    return traces


def rng(seed):
    return np.random.default_rng(seed)
