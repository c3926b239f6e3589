"""Inputs and adapters from files for `peft-tagi predict`, and where the quickstart leaves its model.

The command generates one adapter per instruction (`pipeline.generate_adapters`) and then serves every input under it
(`pipeline.generate_outputs` inside `use_adapter`): the instruction is encoded once, not once per batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .adapter import TaskAdapter

QUICKSTART_DIR = Path("tagi-quickstart")
# Where `peft-tagi quickstart` writes its base model (with the tokenizer) and its TAGI checkpoint.
QUICKSTART_BASE = QUICKSTART_DIR / "work" / "base"
QUICKSTART_TAGI = QUICKSTART_DIR / "work" / "tagi"
# What a newcomer tries on the quickstart's model (the README's `predict` example is the first; the demo page offers
# all): two steps in one instruction, tasks trained on under every quickstart seed 0-4, in training wordings.
# (instruction, inputs, the correct outputs); tests/test_cli.py checks the outputs against the suite's own tasks.
# The first is the task TAGI got most often exactly right, apart from counting to two, on three validation runs of
# the default (`python -m bench.readme_example`, bench/results/readme_example.json: 68.8-81.2 % of 16 inputs per run),
# on inputs that those three and the default's held-out runs of seeds 0-4 all answered right (the one with two
# animals and the shortest with one; the README says so); `bench/quality.py` records what the default's own runs
# print for it.
QUICKSTART_EXAMPLES = (
    (
        "First write every word twice, then keep only the animals.",
        ("apple bread pig cow hat", "milk red bee"),
        ("pig pig cow cow", "bee bee"),
    ),
    (
        "First reverse the order of the words, then remove the first word.",
        ("cat dog sun tree", "red milk moon"),
        ("sun dog cat", "milk red"),
    ),
    (
        "First swap the first and the last word, then replace every word with its kind.",
        ("cat red apple sun",),
        ("thing color food animal",),
    ),
    (
        "First move the first word to the end, then replace every word with its partner.",
        ("cat red apple", "sun tree"),
        ("blue pear dog", "rock moon"),
    ),
    (
        "First write every word twice, then keep only the first two words.",
        ("fox cup tea",),
        ("fox fox",),
    ),
)


def read_inputs(path: str) -> list[str]:
    """Inputs from a file (`-` for stdin): JSON Lines with an `input` field, or plain text with one input per line.

    JSON Lines is recognised by the `.jsonl` suffix or by a first non-empty line that starts with `{`. Plain-text
    lines are kept as they are (an empty line is an empty input), so output line N answers input line N.
    """
    if path == "-":
        text = sys.stdin.read()
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"Input file {path} not found; pass a text file (one input per line) or JSONL.")
        text = file.read_text(encoding="utf-8")
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if not (path.endswith(".jsonl") or first.lstrip().startswith("{")):
        return lines
    inputs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({err.msg}); JSONL needs one object per line."
            ) from err
        if not isinstance(row, dict) or not isinstance(row.get("input"), str):
            raise ValueError(
                f'{path}, line {number}: a JSONL row needs a string field "input", e.g. {{"input": "..."}}.'
            )
        inputs.append(row["input"])
    return inputs


def load_adapter_folder(path: str) -> TaskAdapter:
    """A saved `TaskAdapter` or exported LoRA folder, with an error that says what the folder must hold."""
    try:
        return TaskAdapter.load(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"--adapter {path}: {err} Pass a folder written by `peft-tagi generate-adapter` or a PEFT LoRA folder."
        ) from err


__all__ = ["QUICKSTART_BASE", "QUICKSTART_EXAMPLES", "QUICKSTART_TAGI", "load_adapter_folder", "read_inputs"]
