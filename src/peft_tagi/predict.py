"""Batch prediction for the command line and the demo: read inputs, generate with an adapter or the bare base.

The TAGI model generates one adapter per instruction (`TaskAdapter.from_instruction`) and then serves every input
under it (`use_adapter`): the instruction is encoded once, not once per batch. The same functions run the frozen
base model with the TAGI layers bypassed, for side-by-side comparison.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .adapter import TaskAdapter

logger = logging.get_logger(__name__)

QUICKSTART_DIR = Path("tagi-quickstart")
# Where `peft-tagi quickstart` writes its base model (with the tokenizer) and its TAGI checkpoint.
QUICKSTART_BASE = QUICKSTART_DIR / "work" / "base"
QUICKSTART_TAGI = QUICKSTART_DIR / "work" / "tagi"


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


@contextlib.contextmanager
def base_model_only(model) -> Iterator[None]:
    """Run a PEFT model as its frozen base model: every adapter layer bypassed inside the block."""
    with model.disable_adapter():
        yield


def generate_outputs(
    model,
    tokenizer,
    inputs: list[str],
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    progress: bool | None = None,
) -> list[str]:
    """Generate one output string per input, in batches.

    Args:
        model: a generation model (a TAGI or LoRA `PeftModel`, or a plain transformers model).
        tokenizer: its tokenizer.
        inputs: the task inputs (without the instruction: the adapter carries it).
        context: entered around every `generate` call, e.g. `lambda: model.use_adapter(adapter)` or
            `lambda: base_model_only(model)`.
        batch_size: inputs per `generate` call.
        max_new_tokens, num_beams: generation options.
        progress: show a progress bar; `None` shows one when there is more than one batch.

    Returns:
        The decoded outputs, stripped, in the order of `inputs`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    is_causal = not model.config.is_encoder_decoder
    # A decoder-only model continues the prompt, so its padding goes on the left and the prompt is cut off after.
    padding_side = tokenizer.padding_side
    if is_causal:
        tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    starts = range(0, len(inputs), batch_size)
    outputs: list[str] = []
    try:
        for start in tqdm(starts, desc="generating", unit="batch", disable=not (progress or len(starts) > 1)):
            batch = inputs[start : start + batch_size]
            encoding = tokenizer(batch, return_tensors="pt", padding=True, truncation=True).to(device)
            with torch.no_grad(), context():
                ids = model.generate(**encoding, max_new_tokens=max_new_tokens, num_beams=num_beams)
            if is_causal:
                ids = ids[:, encoding["input_ids"].shape[1] :]
            outputs.extend(text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def load_adapter_folder(path: str) -> TaskAdapter:
    """A saved `TaskAdapter` or exported LoRA folder, with an error that says what the folder must hold."""
    try:
        return TaskAdapter.load(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"--adapter {path}: {err} Pass a folder written by `peft-tagi generate-adapter` or a PEFT LoRA folder."
        ) from err


__all__ = ["QUICKSTART_BASE", "QUICKSTART_TAGI", "base_model_only", "generate_outputs", "read_inputs"]
