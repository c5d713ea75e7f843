"""Rows and a label helper shared by the data tests."""

from __future__ import annotations

from qlora_fsdp.data import IGNORE_INDEX

WORDS = "ab cde fgh ijkl mnop".split()
ROWS = [{"instruction": f"Reverse the word {i}.", "input": w, "output": w[::-1]} for i, w in enumerate(WORDS)]


def trained_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of positions whose label is not -100, as lists of label ids."""
    spans, run = [], []
    for t, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if run:
                spans.append(run)
            run = []
        else:
            assert lab == t, "an unmasked label must equal its input id"
            run.append(lab)
    return spans + ([run] if run else [])
