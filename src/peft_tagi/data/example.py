"""The one example format every reader produces and every collator reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

EXAMPLE_KEYS = ("task_name", "instruction", "input", "output", "category", "choices", "references")


def example_features() -> datasets.Features:
    """The `datasets` schema of the format, so that readers' datasets concatenate (empty `choices` lists would
    otherwise be typed as null)."""
    import datasets

    string = datasets.Value("string")
    return datasets.Features(
        {
            "task_name": string,
            "instruction": string,
            "input": string,
            "output": string,
            "category": string,
            "choices": datasets.Sequence(string),
            "references": datasets.Sequence(string),
        }
    )
