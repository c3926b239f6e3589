"""Reader for Super-NaturalInstructions (SNI) in the layout of the allenai/natural-instructions repository.

Expected layout (the original repository's, or any slice of it)::

    <path>/tasks/<task_name>.json           one file per task (Definition, Positive Examples, Instances, ...)
    <path>/splits/default/train_tasks.txt   one task name per line (756 tasks in SNI v2)
    <path>/splits/default/test_tasks.txt    one task name per line (119 tasks in SNI v2)

Tasks listed in a split file whose JSON file is absent are skipped (and counted in a log message), so a partial copy
of the repository reads unchanged.

Every example is a dict with exactly these keys:

- ``task_name``: the task's file stem, e.g. ``"task1146_country_capital"``.
- ``instruction``: what the hypernetwork reads, once per task (see below).
- ``input``: the raw instance input, exactly as stored in the task file (no prefix, no stripping).
- ``output``: the training target, the first reference of the instance.
- ``category``: the first of the task's ``Categories`` (TAGI trains one teacher LoRA per category).
- ``choices``: always ``[]`` (SNI is evaluated by generation, not by rank classification).
- ``references``: all acceptable outputs of the instance, for ROUGE-L / exact match.

Instruction format (Tk-Instruct's ``DataCollatorForNI``, reproduced character for character)::

    definition = "Definition: " + Definition[0].strip()
    definition += "." if it does not end with a punctuation character (``string.punctuation``)
    definition += "\\n\\n"

and, for each of the first ``num_pos_examples`` positive examples (``idx`` from 0)::

    f" Positive Example {idx + 1} -\\n"
    + f"Input: {example['input'].strip()}"   (+ "." unless it ends with punctuation) + "\\n"
    + f" Output: {example['output'].strip()}"  (+ "." unless it ends with punctuation) + "\\n"
    + "\\n"

``instruction = definition + "".join(positive_examples)``. The instance is *not* part of the instruction: TAGI
encodes the instruction once per task and feeds the instance to the model separately. Tk-Instruct's own
instance suffix is available as :func:`format_tk_instruct_input`, so the meta-trained teacher's full source is
``instruction + format_tk_instruct_input(input)``, identical to Tk-Instruct's ``source`` (Tk-Instruct additionally
drops positive examples that would overflow ``max_source_length``; that token-level truncation is left to the
collator, which knows the tokenizer).
"""

from __future__ import annotations

import json
import logging
import os
import random
import string
from typing import Any

import datasets

from .example import EXAMPLE_KEYS, example_features

logger = logging.getLogger(__name__)

EXPECTED_LAYOUT = (
    "tasks/<task_name>.json and splits/default/{train,test}_tasks.txt (the allenai/natural-instructions layout)"
)

EXAMPLE_FEATURES = example_features()


def _end_with_punctuation(text: str) -> str:
    """Append "." unless `text` ends with a punctuation character, as Tk-Instruct does for every field."""
    # Tk-Instruct tests `text[-1] in string.punctuation`; an empty string would raise there, we just add the ".".
    if not text or text[-1] not in string.punctuation:
        return text + "."
    return text


def format_tk_instruct_definition(definition: str | list[str]) -> str:
    """Tk-Instruct's definition block: ``"Definition: <def>"`` + "." if needed + a blank line.

    A list (the SNI schema stores ``Definition`` as a list of strings) contributes its first element.
    """
    if isinstance(definition, list):
        definition = definition[0] if definition else ""
    return _end_with_punctuation("Definition: " + definition.strip()) + "\n\n"


def format_tk_instruct_positive_example(example: dict[str, Any], idx: int) -> str:
    """Tk-Instruct's block for the positive example number ``idx`` (0-based), ending with a blank line."""
    text = f" Positive Example {idx + 1} -\n"
    text = _end_with_punctuation(text + f"Input: {example['input'].strip()}") + "\n"
    text = _end_with_punctuation(text + f" Output: {example['output'].strip()}") + "\n"
    return text + "\n"


def format_tk_instruct_input(instance_input: str) -> str:
    """Tk-Instruct's instance suffix: ``"Now complete the following example -\\nInput: <input>.\\nOutput: "``.

    Concatenated after the instruction it gives the exact source text Tk-Instruct (the SNI teacher) was trained on.
    """
    text = "Now complete the following example -\n"
    text = _end_with_punctuation(text + f"Input: {instance_input.strip()}") + "\n"
    return text + "Output: "


def build_sni_instruction(task: dict[str, Any], num_pos_examples: int = 0) -> str:
    """The instruction of one SNI task: Tk-Instruct's definition block followed by ``num_pos_examples`` examples."""
    instruction = format_tk_instruct_definition(task.get("Definition", ""))
    positives = task.get("Positive Examples", [])[:num_pos_examples]
    return instruction + "".join(format_tk_instruct_positive_example(ex, i) for i, ex in enumerate(positives))


def _is_english(task: dict[str, Any]) -> bool:
    return all(task.get(key) == ["English"] for key in ("Input_language", "Output_language", "Instruction_language"))


def _check_layout(path: str | os.PathLike, split: str) -> tuple[str, str]:
    """Return (tasks_dir, split_file), raising a clear error when `path` is not an SNI folder."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"SNI folder {root!r} does not exist; expected a folder with {EXPECTED_LAYOUT}.")
    tasks_dir = os.path.join(root, "tasks")
    if not os.path.isdir(tasks_dir):
        raise FileNotFoundError(f"{root!r} has no 'tasks' folder; expected a folder with {EXPECTED_LAYOUT}.")
    split_file = os.path.join(root, "splits", "default", f"{split}_tasks.txt")
    if not os.path.isfile(split_file):
        raise FileNotFoundError(
            f"Split file {split_file!r} not found for split={split!r}; expected a folder with {EXPECTED_LAYOUT}."
        )
    return tasks_dir, split_file


def read_sni_tasks(
    path: str | os.PathLike,
    split: str = "train",
    max_instances_per_task: int | None = 100,
    num_pos_examples: int = 0,
    english_only: bool = True,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Read the tasks of one SNI split as examples in the peft-tagi format (see the module docstring).

    Args:
        path: root of a natural-instructions checkout or slice (``tasks/`` + ``splits/default/``).
        split: ``"train"`` or ``"test"`` (reads ``splits/default/<split>_tasks.txt``).
        max_instances_per_task: keep at most this many instances per task (the SNI/TAGI setting is 100);
            ``None`` keeps all.
        num_pos_examples: number of positive examples appended to the definition (0: "Def", 2: "Def + 2 Pos").
        english_only: keep only tasks whose input, output and instruction languages are all ``["English"]``.
        seed: ``None`` takes the first instances of each task (deterministic; for the test split these are SNI's
            label-balanced evaluation instances). An integer shuffles each task's instances with
            ``random.Random(seed)`` before capping, a reproducible version of Tk-Instruct's training sampler.

    Returns:
        A list of example dicts, tasks in split-file order, instances in file (or seeded shuffle) order.

    Raises:
        FileNotFoundError: `path` is not an SNI folder or the split file is missing.
        ValueError: invalid `split`, `max_instances_per_task` or `num_pos_examples`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if max_instances_per_task is not None and max_instances_per_task < 0:
        raise ValueError(f"max_instances_per_task must be >= 0 or None, got {max_instances_per_task}.")
    if num_pos_examples < 0:
        raise ValueError(f"num_pos_examples must be >= 0, got {num_pos_examples}.")
    tasks_dir, split_file = _check_layout(path, split)

    with open(split_file, encoding="utf-8") as f:
        task_names = [line.strip() for line in f if line.strip()]

    examples: list[dict[str, Any]] = []
    missing, non_english, no_output = [], [], 0
    for task_name in task_names:
        task_file = os.path.join(tasks_dir, task_name + ".json")
        if not os.path.isfile(task_file):
            missing.append(task_name)
            continue
        with open(task_file, encoding="utf-8") as f:
            task = json.load(f)
        if english_only and not _is_english(task):
            non_english.append(task_name)
            continue

        instruction = build_sni_instruction(task, num_pos_examples)
        categories = task.get("Categories") or [""]
        instances = list(task.get("Instances", []))
        if seed is not None:
            # One generator per task, seeded from (seed, task) so a task's sample does not depend on which other
            # tasks are present in the folder.
            random.Random(f"{seed}:{task_name}").shuffle(instances)
        if max_instances_per_task is not None:
            instances = instances[:max_instances_per_task]
        for instance in instances:
            outputs = instance.get("output", [])
            if isinstance(outputs, str):
                outputs = [outputs]
            if not outputs:
                # Nothing to train on or to score against; SNI has none of these, but slices might.
                no_output += 1
                continue
            examples.append(
                {
                    "task_name": task_name,
                    "instruction": instruction,
                    "input": instance["input"],
                    "output": outputs[0],
                    "category": categories[0],
                    "choices": [],
                    "references": list(outputs),
                }
            )

    if missing:
        logger.info(
            "SNI %s split: skipped %d of %d listed tasks whose file is absent from %s.",
            split,
            len(missing),
            len(task_names),
            tasks_dir,
        )
    if non_english:
        logger.info("SNI %s split: skipped %d non-English tasks.", split, len(non_english))
    if no_output:
        logger.warning("SNI %s split: skipped %d instances without any output.", split, no_output)
    logger.info(
        "SNI %s split: %d examples from %d tasks.", split, len(examples), len({ex["task_name"] for ex in examples})
    )
    return examples


def sni_dataset(path: str | os.PathLike, split: str = "train", **kwargs: Any) -> datasets.Dataset:
    """`read_sni_tasks` as a `datasets.Dataset` (same keys as columns; `kwargs` go to `read_sni_tasks`)."""
    examples = read_sni_tasks(path, split=split, **kwargs)
    if not examples:
        # from_list([]) would give a dataset without columns; keep the schema so downstream `.map` calls work.
        return datasets.Dataset.from_dict({key: [] for key in EXAMPLE_KEYS}, features=EXAMPLE_FEATURES)
    return datasets.Dataset.from_list(examples, features=EXAMPLE_FEATURES)
