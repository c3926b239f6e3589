"""Tests for the SNI and P3 readers: the example format, Tk-Instruct formatting, filters, caps and errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest

from peft_tagi.data.p3 import (
    T0_HELD_OUT_TASK_NAMES,
    T0_TRAIN_DATASET_NAMES,
    TAGI_P3_TRAIN_DATASETS,
    is_t0_held_out,
    p3_dataset,
    p3_dataset_name,
    p3_examples,
    p3_gold_index,
    p3_task_cluster,
)
from peft_tagi.data.sni import (
    EXAMPLE_KEYS,
    format_tk_instruct_input,
    read_sni_tasks,
    sni_dataset,
)

REAL_SNI = Path(__file__).resolve().parents[2] / "shared" / "data" / "sni"


# ----------------------------------------------------------------------------------------------------------------------
# SNI fixture: a folder in the natural-instructions layout, written in code.


def _task(definition, instances, language="English", categories=("Question Answering",), positives=()):
    return {
        "Contributors": ["fixture"],
        "Source": ["fixture"],
        "Categories": list(categories),
        "Definition": definition,
        "Input_language": [language],
        "Output_language": [language],
        "Instruction_language": [language],
        "Positive Examples": [{"input": i, "output": o, "explanation": "because"} for i, o in positives],
        "Negative Examples": [],
        "Instances": [{"id": f"id-{k}", "input": inp, "output": out} for k, (inp, out) in enumerate(instances)],
    }


CAP_TASK = _task(
    # No final punctuation: Tk-Instruct appends "."; surrounding whitespace is stripped.
    ["  Answer the arithmetic question  ", "an unused second definition"],
    [(f"What is {k} + {k}?", [str(2 * k), f"{2 * k}.0"] if k == 0 else [str(2 * k)]) for k in range(5)],
    categories=("Mathematics", "Question Answering"),
    positives=[("What is 1 + 1?", "2"), ("  Add 3 and 4 ", "7!"), ("third", "never shown")],
)
FRENCH_TASK = _task(["Traduisez la phrase."], [("bonjour", ["hello"])], language="French")
TEST_TASK = _task(
    "Say yes.", [("Is it?", ["yes"]), ("Really?", ["yes"])], categories=("Answerability Classification",)
)


@pytest.fixture
def sni_root(tmp_path: Path) -> Path:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "splits" / "default").mkdir(parents=True)
    for name, task in {"task001_cap": CAP_TASK, "task002_french": FRENCH_TASK, "task003_test": TEST_TASK}.items():
        (tmp_path / "tasks" / f"{name}.json").write_text(json.dumps(task), encoding="utf-8")
    # task999_missing is listed but has no file, as in the shared slice.
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text("task001_cap\ntask002_french\ntask999_missing\n")
    (tmp_path / "splits" / "default" / "test_tasks.txt").write_text("task003_test\n")
    return tmp_path


def test_sni_example_format(sni_root):
    examples = read_sni_tasks(sni_root, "train")
    assert [ex["task_name"] for ex in examples] == ["task001_cap"] * 5
    for ex in examples:
        assert tuple(ex) == EXAMPLE_KEYS
        assert ex["category"] == "Mathematics"
        assert ex["choices"] == []
        assert ex["output"] == ex["references"][0]
    first = examples[0]
    assert first["input"] == "What is 0 + 0?"  # raw instance input, no Tk-Instruct wrapping
    assert first["output"] == "0"
    assert first["references"] == ["0", "0.0"]


def test_sni_definition_only_instruction(sni_root):
    ex = read_sni_tasks(sni_root, "train")[0]
    assert ex["instruction"] == "Definition: Answer the arithmetic question.\n\n"
    # A definition given as a plain string (not a list) and already ending with punctuation.
    assert read_sni_tasks(sni_root, "test")[0]["instruction"] == "Definition: Say yes.\n\n"


def test_sni_positive_examples_in_tk_instruct_format(sni_root):
    ex = read_sni_tasks(sni_root, "train", num_pos_examples=2)[0]
    expected = (
        "Definition: Answer the arithmetic question.\n\n"
        " Positive Example 1 -\nInput: What is 1 + 1?\n Output: 2.\n\n"
        " Positive Example 2 -\nInput: Add 3 and 4.\n Output: 7!\n\n"
    )
    assert ex["instruction"] == expected
    # Asking for more examples than the task has uses them all, and no more.
    assert read_sni_tasks(sni_root, "train", num_pos_examples=10)[0]["instruction"].count("Positive Example") == 3


def test_tk_instruct_input_suffix():
    assert (
        format_tk_instruct_input("  What is 2+2? ")
        == "Now complete the following example -\nInput: What is 2+2?\nOutput: "
    )
    assert format_tk_instruct_input("hello") == "Now complete the following example -\nInput: hello.\nOutput: "


def test_sni_english_filter(sni_root):
    assert {ex["task_name"] for ex in read_sni_tasks(sni_root, "train")} == {"task001_cap"}
    all_tasks = read_sni_tasks(sni_root, "train", english_only=False)
    assert {ex["task_name"] for ex in all_tasks} == {"task001_cap", "task002_french"}


def test_sni_instance_cap_is_a_prefix(sni_root):
    capped = read_sni_tasks(sni_root, "train", max_instances_per_task=3)
    assert [ex["input"] for ex in capped] == [f"What is {k} + {k}?" for k in range(3)]
    assert len(read_sni_tasks(sni_root, "train", max_instances_per_task=None)) == 5
    assert read_sni_tasks(sni_root, "train", max_instances_per_task=0) == []


def test_sni_seeded_sampling_is_reproducible(sni_root):
    def inputs(seed):
        return [ex["input"] for ex in read_sni_tasks(sni_root, "train", max_instances_per_task=3, seed=seed)]

    all_inputs = {f"What is {k} + {k}?" for k in range(5)}
    assert inputs(0) == inputs(0)
    assert all(set(inputs(seed)) <= all_inputs and len(inputs(seed)) == 3 for seed in range(5))
    # Some seed must pick something other than the first three instances.
    assert any(inputs(seed) != inputs(None) for seed in range(5))


def test_sni_logs_skipped_missing_tasks(sni_root, caplog):
    with caplog.at_level(logging.INFO, logger="peft_tagi.data.sni"):
        read_sni_tasks(sni_root, "train")
    assert "skipped 1 of 3 listed tasks" in caplog.text


def test_sni_layout_errors(tmp_path, sni_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sni_tasks(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tasks"):
        read_sni_tasks(tmp_path / "empty")
    (sni_root / "splits" / "default" / "test_tasks.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_tasks.txt"):
        read_sni_tasks(sni_root, "test")
    with pytest.raises(ValueError, match="split"):
        read_sni_tasks(sni_root, "dev")


def test_sni_dataset(sni_root):
    ds = sni_dataset(sni_root, "train", max_instances_per_task=2, num_pos_examples=1)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == list(EXAMPLE_KEYS) and len(ds) == 2
    assert ds[0]["references"] == ["0", "0.0"] and ds[0]["choices"] == []
    empty = sni_dataset(sni_root, "train", max_instances_per_task=0)
    assert len(empty) == 0 and empty.column_names == list(EXAMPLE_KEYS)


# ----------------------------------------------------------------------------------------------------------------------
# The real SNI slice in ../shared/data/sni.


@pytest.fixture
def real_sni() -> Path:
    if not (REAL_SNI / "tasks").is_dir():
        pytest.skip(f"real SNI slice not found at {REAL_SNI} (shared data is not checked out next to the project)")
    return REAL_SNI


def test_real_sni_slice(real_sni, caplog):
    with caplog.at_level(logging.INFO, logger="peft_tagi.data.sni"):
        train = read_sni_tasks(real_sni, "train")
        test = read_sni_tasks(real_sni, "test", num_pos_examples=2)
    # Per the slice's README: 23 train and 20 test tasks present out of the 756 / 119 listed.
    assert len({ex["task_name"] for ex in train}) == 23
    assert len({ex["task_name"] for ex in test}) == 20
    assert "skipped 733 of 756" in caplog.text and "skipped 99 of 119" in caplog.text
    per_task: dict[str, int] = {}
    for ex in train + test:
        assert tuple(ex) == EXAMPLE_KEYS
        assert ex["instruction"].startswith("Definition: ")
        assert ex["output"] == ex["references"][0] and ex["category"]
        per_task[ex["task_name"]] = per_task.get(ex["task_name"], 0) + 1
    assert max(per_task.values()) == 100  # task1191_food_veg_nonveg has 101 instances: capped
    assert all(ex["instruction"].count("Positive Example") == 2 for ex in test)


# ----------------------------------------------------------------------------------------------------------------------
# P3.


def _p3_rows(n=4, **extra):
    data = {
        "inputs_pretokenized": [f"Premise {i}. Question: does it follow? Yes or no?" for i in range(n)],
        "targets_pretokenized": [" yes" if i % 2 == 0 else "no " for i in range(n)],
        "answer_choices": [[" yes", "no "] for _ in range(n)],
        "premise": [f"Premise {i}." for i in range(n)],
    }
    data.update(extra)
    return datasets.Dataset.from_dict(data)


def test_p3_instruction_layout():
    examples = p3_examples(_p3_rows(), task_name="super_glue_rte_GPT_3_style", instruction="Decide entailment.")
    assert len(examples) == 4
    ex = examples[1]
    assert tuple(ex) == EXAMPLE_KEYS
    assert ex["instruction"] == "Decide entailment."
    assert ex["input"] == "Premise 1. Question: does it follow? Yes or no?"
    assert ex["output"] == "no" and ex["references"] == ["no"]
    assert ex["choices"] == ["yes", "no"]
    assert ex["category"] == "super_glue_rte"
    assert p3_gold_index(ex) == 1 and p3_gold_index(examples[0]) == 0


def test_p3_input_column_layout():
    ex = p3_examples(_p3_rows(), task_name="super_glue_rte_GPT_3_style", input_column="premise")[2]
    assert ex["instruction"] == "Premise 2. Question: does it follow? Yes or no?"
    assert ex["input"] == "Premise 2."


def test_p3_argument_errors():
    rows = _p3_rows()
    with pytest.raises(ValueError, match="exactly one"):
        p3_examples(rows, task_name="x")
    with pytest.raises(ValueError, match="exactly one"):
        p3_examples(rows, task_name="x", instruction="i", input_column="premise")
    with pytest.raises(ValueError, match="task_name"):
        p3_examples(rows, instruction="i")  # a from_dict dataset has no config name
    with pytest.raises(ValueError, match="missing_column"):
        p3_examples(rows, task_name="x", input_column="missing_column")
    with pytest.raises(ValueError, match="targets_pretokenized"):
        p3_examples(rows.remove_columns("targets_pretokenized"), task_name="x", instruction="i")
    score_eval = _p3_rows(is_correct=[True, False, True, False])
    with pytest.raises(ValueError, match="score_eval"):
        p3_examples(score_eval, task_name="super_glue_rte_GPT_3_style_score_eval", instruction="i")


def test_p3_cap_category_and_no_choices():
    rows = _p3_rows(n=6).remove_columns("answer_choices")
    examples = p3_examples(rows, task_name="xsum_summarize_DOC", instruction="Summarize.", max_instances=3)
    assert [ex["input"][:9] for ex in examples] == ["Premise 0", "Premise 1", "Premise 2"]
    assert all(ex["choices"] == [] and ex["category"] == "xsum" for ex in examples)
    assert p3_examples(rows, task_name="xsum_x", instruction="s", category="custom")[0]["category"] == "custom"
    assert p3_examples(rows, task_name="not_a_t0_dataset", instruction="s")[0]["category"] == ""
    assert len(p3_examples(rows, task_name="xsum_x", instruction="s", max_instances=None)) == 6
    with pytest.raises(ValueError, match="no"):
        p3_gold_index(examples[0])


def test_p3_loads_local_paths(tmp_path):
    rows = _p3_rows()
    saved = tmp_path / "super_glue_cb_can_we_infer"
    rows.save_to_disk(str(saved))
    examples = p3_examples(saved, instruction="NLI.")
    assert examples[0]["task_name"] == "super_glue_cb_can_we_infer" and examples[0]["category"] == "super_glue_cb"
    assert len(examples) == 4

    jsonl = tmp_path / "hellaswag_complete_first_then.jsonl"
    rows.to_json(str(jsonl))
    examples = p3_examples(str(jsonl), instruction="Complete.", max_instances=2)
    assert len(examples) == 2 and examples[0]["category"] == "hellaswag" and examples[0]["choices"] == ["yes", "no"]

    dataset_dict = datasets.DatasetDict({"validation": rows})
    assert len(p3_examples(dataset_dict, task_name="x", instruction="i", split="validation")) == 4
    with pytest.raises(ValueError, match="available splits"):
        p3_examples(dataset_dict, task_name="x", instruction="i")


def test_p3_and_sni_share_one_schema(sni_root):
    p3 = p3_dataset(_p3_rows(), task_name="super_glue_rte_x", instruction="i")
    sni = sni_dataset(sni_root, "train")
    both = datasets.concatenate_datasets([sni, p3])
    assert len(both) == len(sni) + len(p3) and both.column_names == list(EXAMPLE_KEYS)


def test_t0_split_lists():
    assert len(T0_TRAIN_DATASET_NAMES) == 38  # t-zero datasets.csv, do_train == BASE
    assert len(TAGI_P3_TRAIN_DATASETS) == 36  # TAGI: without quarel and trec
    assert len(T0_HELD_OUT_TASK_NAMES) == 11
    assert not set(T0_TRAIN_DATASET_NAMES) & set(T0_HELD_OUT_TASK_NAMES)
    assert {"anli_r1", "anli_r2", "anli_r3", "super_glue_cb", "super_glue_rte", "super_glue_copa"} <= set(
        T0_HELD_OUT_TASK_NAMES
    )


@pytest.mark.parametrize(
    ("subset", "dataset", "cluster", "held_out"),
    [
        ("super_glue_rte_GPT_3_style", "super_glue_rte", "natural_language_inference", True),
        ("anli_can_we_infer_r2", "anli_r2", "natural_language_inference", True),
        ("anli_GPT_3_style_r3_score_eval", "anli_r3", "natural_language_inference", True),
        ("super_glue_wsc.fixed_GPT_3_Style", "super_glue_wsc.fixed", "coreference_resolution", True),
        ("paws_labeled_final_Concatenation", "paws_labeled_final", "paraphrase_identification", False),
        ("glue_mrpc_equivalent", "glue_mrpc", "paraphrase_identification", False),
        ("wiki_qa_Is_This_True_", "wiki_qa", "closed_book_qa", False),
        ("wiki_hop_original_choose_best_object", "wiki_hop_original", "multiple_choice_qa", False),
        ("winogrande_winogrande_debiased_Replace", None, None, False),
        ("super_glue_boolq_GPT_3_Style", None, None, False),
    ],
)
def test_p3_dataset_name(subset, dataset, cluster, held_out):
    assert p3_dataset_name(subset) == dataset
    assert p3_task_cluster(subset) == cluster
    assert is_t0_held_out(subset) is held_out
