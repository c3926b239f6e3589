"""Reader for P3 (bigscience/P3, the prompted datasets of T0) and the T0 train / held-out split as data.

A P3 subset (e.g. ``super_glue_rte_GPT_3_style``) is one dataset rendered through one promptsource template. Its rows
carry ``inputs_pretokenized`` (the prompted instance, as T0 reads it), ``targets_pretokenized`` (the answer) and, for
classification-like templates, ``answer_choices`` (the options scored by rank classification).

**Instruction / input split.** P3 prompts interleave the task wording with the instance's text, and the template
without its fields is not stored in P3, so a task-level instruction cannot be recovered from a row. Rather than
invent one, :func:`p3_examples` makes the caller choose, explicitly, one of two layouts:

1. ``instruction="..."`` (a task-level string the caller wrote or took from promptsource): every example gets that
   ``instruction`` and ``input = inputs_pretokenized``. The hypernetwork reads one instruction per task and the model
   reads exactly what T0 reads. This is the TAGI layout.
2. ``input_column="..."`` (a column of the dataset holding the bare instance text, e.g. joined in from the source
   dataset): ``instruction = inputs_pretokenized`` and ``input = row[input_column]``. The instruction then differs per
   instance (it contains the instance), which is what the HINT/TAGI reference code does on P3.

Passing neither (or both) raises ``ValueError``. In both layouts ``output = targets_pretokenized.strip()``,
``references = [output]``, ``choices = [c.strip() for c in answer_choices]`` (``[]`` without that column), and
``category`` defaults to the T0 dataset the subset belongs to (:func:`p3_dataset_name`), because TAGI trains one
teacher LoRA per P3 dataset (36 of them).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import datasets

from .sni import EXAMPLE_FEATURES

logger = logging.getLogger(__name__)

# T0's training mixture (bigscience-workshop/t-zero, `t0/datasets.csv`, rows with do_train == "BASE"), grouped by the
# task clusters of the T0 paper. Names are P3 subset prefixes: "<HF dataset>_<HF config>", as P3 names its subsets.
T0_TRAIN_DATASETS: dict[str, tuple[str, ...]] = {
    "multiple_choice_qa": (
        "cos_e_v1.11",  # CommonsenseQA with explanations
        "cosmos_qa",
        "dream",
        "qasc",
        "quail",
        "quarel",
        "quartz",
        "sciq",
        "social_i_qa",
        "wiki_hop_original",
        "wiqa",
    ),
    "extractive_qa": (
        "adversarial_qa_dbidaf",
        "adversarial_qa_dbert",
        "adversarial_qa_droberta",
        "duorc_SelfRC",
        "duorc_ParaphraseRC",
        "ropes",
        "quoref",
    ),
    "closed_book_qa": ("kilt_tasks_hotpotqa", "wiki_qa"),
    "sentiment": ("amazon_polarity", "app_reviews", "imdb", "rotten_tomatoes", "yelp_review_full"),
    "topic_classification": ("ag_news", "dbpedia_14", "trec"),
    "structure_to_text": ("common_gen", "wiki_bio"),
    "summarization": ("cnn_dailymail_3.0.0", "gigaword", "multi_news", "samsum", "xsum"),
    "paraphrase_identification": ("glue_mrpc", "glue_qqp", "paws_labeled_final"),
}

# TAGI's reference configuration (`src/t0.json` of Xnhyacinth/TAGI) trains on T0's mixture without QuaRel and TREC:
# these are the paper's "36 training datasets" (and its 36 P3 teacher LoRAs).
TAGI_EXCLUDED_TRAIN_DATASETS: tuple[str, ...] = ("quarel", "trec")
TAGI_P3_TRAIN_DATASETS: tuple[str, ...] = tuple(
    name for names in T0_TRAIN_DATASETS.values() for name in names if name not in TAGI_EXCLUDED_TRAIN_DATASETS
)

# T0's held-out evaluation (the 11 tasks of the T0 paper; ANLI counts once per round), grouped by task cluster.
# ANLI's P3 subsets carry the round as a suffix (``anli_GPT_3_style_r1``); see `p3_dataset_name`.
T0_HELD_OUT_TASKS: dict[str, tuple[str, ...]] = {
    "natural_language_inference": ("anli_r1", "anli_r2", "anli_r3", "super_glue_cb", "super_glue_rte"),
    "coreference_resolution": ("super_glue_wsc.fixed", "winogrande_winogrande_xl"),
    "sentence_completion": ("super_glue_copa", "hellaswag", "story_cloze_2016"),
    "word_sense_disambiguation": ("super_glue_wic",),
}

T0_TRAIN_DATASET_NAMES: tuple[str, ...] = tuple(name for names in T0_TRAIN_DATASETS.values() for name in names)
T0_HELD_OUT_TASK_NAMES: tuple[str, ...] = tuple(name for names in T0_HELD_OUT_TASKS.values() for name in names)

_CLUSTER_OF: dict[str, str] = {
    name: cluster
    for table in (T0_TRAIN_DATASETS, T0_HELD_OUT_TASKS)
    for cluster, names in table.items()
    for name in names
}
# Longest names first, so that a subset is attributed to the most specific dataset prefix.
_PREFIXES = sorted((name for name in _CLUSTER_OF if not name.startswith("anli_")), key=len, reverse=True)
_ANLI_ROUND = re.compile(r"_(r[123])(?:_score_eval)?$")

REQUIRED_COLUMNS = ("inputs_pretokenized", "targets_pretokenized")


def p3_dataset_name(subset: str) -> str | None:
    """The T0 dataset (train or held-out name above) a P3 subset belongs to, or ``None`` if it is in neither list.

    Examples: ``"super_glue_rte_GPT_3_style"`` -> ``"super_glue_rte"``, ``"anli_can_we_infer_r2"`` -> ``"anli_r2"``,
    ``"paws_labeled_final_Concatenation"`` -> ``"paws_labeled_final"``.
    """
    if subset.startswith("anli_"):
        match = _ANLI_ROUND.search(subset)
        return f"anli_{match.group(1)}" if match else None
    for name in _PREFIXES:
        if subset == name or subset.startswith(name + "_"):
            return name
    return None


def p3_task_cluster(subset: str) -> str | None:
    """The T0 task cluster (e.g. ``"sentiment"``, ``"natural_language_inference"``) of a P3 subset or dataset."""
    name = p3_dataset_name(subset)
    return _CLUSTER_OF.get(name) if name is not None else None


def is_t0_held_out(subset: str) -> bool:
    """Whether a P3 subset (or dataset name) belongs to one of T0's 11 held-out evaluation tasks."""
    return p3_dataset_name(subset) in T0_HELD_OUT_TASK_NAMES


def _select_split(dataset: datasets.Dataset | datasets.DatasetDict, split: str) -> datasets.Dataset:
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"Split {split!r} not found; available splits: {sorted(dataset)}.")
        return dataset[split]
    return dataset


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _load_p3(path: str, task_name: str | None, split: str) -> datasets.Dataset:
    """Load a P3 subset from a `save_to_disk` folder, a local data file, or a dataset repository id."""
    if os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, marker))
        for marker in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        return _select_split(datasets.load_from_disk(path), split)
    if os.path.isfile(path):
        builder = _FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise ValueError(f"Cannot read {path!r}: supported data files are {sorted(_FILE_BUILDERS)}.")
        # A single data file has one split, which `datasets` calls "train" whatever it holds.
        return datasets.load_dataset(builder, data_files=path, split="train")
    # A dataset repository id (P3 itself: "bigscience/P3" with the subset as config name) or a local data folder.
    return datasets.load_dataset(path, task_name, split=split)


def _default_task_name(dataset_or_path: Any, dataset: datasets.Dataset) -> str | None:
    if isinstance(dataset_or_path, (str, os.PathLike)):
        path = os.fspath(dataset_or_path).rstrip("/\\")
        if os.path.exists(path):
            return os.path.splitext(os.path.basename(path))[0]
    config_name = dataset.info.config_name
    return config_name if config_name and config_name != "default" else None


def p3_examples(
    dataset_or_path: datasets.Dataset | datasets.DatasetDict | str | os.PathLike,
    task_name: str | None = None,
    category: str | None = None,
    max_instances: int | None = 100,
    *,
    instruction: str | None = None,
    input_column: str | None = None,
    split: str = "train",
) -> list[dict[str, Any]]:
    """Turn one P3 subset into examples in the peft-tagi format (see the module docstring for the two layouts).

    Args:
        dataset_or_path: a `datasets.Dataset` / `DatasetDict` with P3's columns, or where to load one from: a
            `save_to_disk` folder, a local ``.json``/``.jsonl``/``.parquet``/``.csv``/``.arrow`` file, or a dataset
            repository id (loaded with ``datasets.load_dataset(id, task_name, split=split)``, e.g. ``"bigscience/P3"``).
        task_name: the P3 subset name, e.g. ``"super_glue_rte_GPT_3_style"``. Defaults to the folder/file name of a
            local path or the loaded dataset's config name; required when neither is available.
        category: defaults to the T0 dataset of the subset (``p3_dataset_name(task_name)``), ``""`` if unknown.
        max_instances: keep the first `max_instances` rows (deterministic); ``None`` keeps all.
        instruction: layout 1, a task-level instruction shared by all rows; ``input`` is ``inputs_pretokenized``.
        input_column: layout 2, the column with the bare instance text; ``instruction`` is ``inputs_pretokenized``.
        split: the split to take from a `DatasetDict` or a repository.

    Raises:
        ValueError: neither or both of `instruction` / `input_column`, missing columns, a ``*_score_eval`` subset
            (one row per answer option; use the plain subset, which has ``answer_choices``), or no task name.
    """
    if (instruction is None) == (input_column is None):
        raise ValueError(
            "p3_examples needs exactly one of `instruction` (a task-level instruction; input = inputs_pretokenized) "
            "or `input_column` (instruction = inputs_pretokenized; input = that column): P3 rows do not separate "
            "the task's wording from the instance."
        )
    if max_instances is not None and max_instances < 0:
        raise ValueError(f"max_instances must be >= 0 or None, got {max_instances}.")

    if isinstance(dataset_or_path, (datasets.Dataset, datasets.DatasetDict)):
        dataset = _select_split(dataset_or_path, split)
    else:
        dataset = _load_p3(os.fspath(dataset_or_path), task_name, split)

    columns = set(dataset.column_names)
    missing = [col for col in REQUIRED_COLUMNS if col not in columns]
    if input_column is not None and input_column not in columns:
        missing.append(input_column)
    if missing:
        raise ValueError(f"P3 dataset lacks column(s) {missing}; it has {sorted(columns)}.")
    if "is_correct" in columns:
        raise ValueError(
            "This looks like a P3 '*_score_eval' subset (one row per answer option, with `is_correct`); "
            "use the plain subset, whose rows carry `answer_choices`."
        )

    task_name = task_name or _default_task_name(dataset_or_path, dataset)
    if not task_name:
        raise ValueError("Cannot infer the P3 subset name from this dataset; pass `task_name`.")
    if category is None:
        category = p3_dataset_name(task_name) or ""
        if not category:
            logger.warning("P3 subset %r is in neither the T0 train nor held-out list; category set to ''.", task_name)

    if max_instances is not None and max_instances < len(dataset):
        dataset = dataset.select(range(max_instances))
    has_choices = "answer_choices" in columns

    examples = []
    for row in dataset:
        output = row["targets_pretokenized"].strip()
        if input_column is None:
            example_instruction, example_input = instruction, row["inputs_pretokenized"]
        else:
            example_instruction, example_input = row["inputs_pretokenized"], str(row[input_column])
        choices = [c.strip() for c in row["answer_choices"]] if has_choices and row["answer_choices"] else []
        examples.append(
            {
                "task_name": task_name,
                "instruction": example_instruction,
                "input": example_input,
                "output": output,
                "category": category,
                "choices": choices,
                "references": [output],
            }
        )
    logger.info("P3 %s: %d examples (category %r).", task_name, len(examples), category)
    return examples


def p3_dataset(
    dataset_or_path: datasets.Dataset | datasets.DatasetDict | str | os.PathLike, **kwargs: Any
) -> datasets.Dataset:
    """`p3_examples` as a `datasets.Dataset` with the shared example schema (`kwargs` go to `p3_examples`)."""
    examples = p3_examples(dataset_or_path, **kwargs)
    if not examples:
        return datasets.Dataset.from_dict({key: [] for key in EXAMPLE_FEATURES}, features=EXAMPLE_FEATURES)
    return datasets.Dataset.from_list(examples, features=EXAMPLE_FEATURES)


def p3_gold_index(example: dict[str, Any]) -> int:
    """Index of the example's `output` among its `choices` (the gold label for rank classification).

    Raises:
        ValueError: the example has no choices or its output is not one of them.
    """
    choices = example.get("choices") or []
    try:
        return list(choices).index(example["output"])
    except ValueError:
        raise ValueError(
            f"Output {example['output']!r} of task {example.get('task_name')!r} is not among its choices {choices}."
        ) from None
