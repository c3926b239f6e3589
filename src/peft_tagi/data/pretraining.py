"""Hypernetwork pretraining data: plain text split into (a -> instruction, b -> input, c -> target)."""

from __future__ import annotations

import random

import datasets


def split_pretraining_text(text: str, seed: int, index: int, min_words: int = 3) -> dict[str, str] | None:
    """Split one text into three contiguous word spans (a, b, c), deterministically for (seed, index).

    a goes to the hypernetwork as the "instruction", b to the model as its input, c is the target: the
    hypernetwork learns to write adapters that help continue a text it alone has read (TAGI stage 2, after HINT).
    Returns None for texts with fewer than 3 · `min_words` words.
    """
    words = text.split()
    n = len(words)
    if n < 3 * min_words:
        return None
    rng = random.Random(f"{seed}:{index}")
    first = rng.randint(min_words, n - 2 * min_words)
    second = rng.randint(first + min_words, n - min_words)
    return {
        "task_name": "pretrain",
        "instruction": " ".join(words[:first]),
        "input": " ".join(words[first:second]),
        "output": " ".join(words[second:]),
        "category": "pretrain",
        "choices": [],
        "references": [" ".join(words[second:])],
    }


def pretraining_dataset(
    source: datasets.Dataset, text_column: str = "text", seed: int = 0, min_words: int = 3
) -> datasets.Dataset:
    """Turn any `datasets` text column into pretraining examples of the one format (short texts are dropped)."""
    if text_column not in source.column_names:
        raise ValueError(
            f"The pretraining source has no column {text_column!r} (columns: {source.column_names}); "
            "pass text_column= with the name of its text column."
        )
    rows = []
    for index, text in enumerate(source[text_column]):
        example = split_pretraining_text(text or "", seed, index, min_words)
        if example is not None:
            rows.append(example)
    if not rows:
        raise ValueError(f"No text in column {text_column!r} has at least {3 * min_words} words to split.")
    return datasets.Dataset.from_list(rows)
