"""Shared fixtures: the real model files live outside the repo (see HARDWIRE_MODELS)."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = ("stories260K.bin", "stories260K.gguf", "tok512.bin", "tok512.model")

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park. One day, she saw a big, red ball. She wanted to play with it, but it was too "
         "high.")


@pytest.fixture(scope="session")
def models_dir():
    """Directory with the real model files: $HARDWIRE_MODELS or ``../shared/models``.

    Fails (does not skip) when a file is missing, so a broken setup is never mistaken for a pass.
    """
    env = os.environ.get("HARDWIRE_MODELS")
    d = Path(env) if env else REPO_ROOT.parent / "shared" / "models"
    d = d.resolve()
    missing = [f for f in MODEL_FILES if not (d / f).is_file()]
    if missing:
        pytest.fail(
            f"model files missing from {d}: {', '.join(missing)}. Set HARDWIRE_MODELS to the "
            "directory holding stories260K.bin, stories260K.gguf, tok512.bin and tok512.model "
            "(see the README for where to download them).", pytrace=False)
    return d


@pytest.fixture(scope="session")
def stories(models_dir):
    from hardwire.compiler.loaders import load_llama2c
    return load_llama2c(models_dir / "stories260K.bin")


@pytest.fixture(scope="session")
def tok512(models_dir):
    from hardwire.compiler.tokenizer import load_tokenizer
    return load_tokenizer(models_dir / "tok512.bin")


def assert_one_line_error(excinfo, path):
    """A user error's message is a single line that names the offending path."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg
