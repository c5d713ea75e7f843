"""The data layer's error: DataError (bad input a user can fix, one line naming the fix) and its one-line helper."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input a user can fix: missing file, unknown dataset, unsupported fields, nothing left to train on."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
