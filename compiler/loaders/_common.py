"""Small helpers shared by the loaders."""

from ..errors import UnsupportedConfigError

__all__ = ["cap_seq_len"]


def cap_seq_len(seq_len, declared, path):
    """Return the context to use: ``declared``, or ``seq_len`` if given and within it.

    Raises
    ------
    UnsupportedConfigError
        ``seq_len`` is not an integer between 1 and ``declared``.
    """
    if seq_len is None:
        return declared
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 < seq_len <= declared:
        raise UnsupportedConfigError(
            f"seq_len {seq_len!r} must be an integer between 1 and the model's declared "
            f"context {declared}", path=path)
    return seq_len
