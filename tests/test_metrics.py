"""Tests for the SNI metrics (hand-computed values) and P3 rank classification."""

from __future__ import annotations

import math

import pytest
import torch

from peft_tagi.metrics import (
    choice_log_likelihoods,
    compute_sni_metrics,
    exact_match,
    normalize_answer,
    rank_classification_accuracy,
    rouge_l,
)


def test_normalize_answer_keeps_articles_like_sni():
    assert normalize_answer("  The Cat,  sat!\n") == "the cat sat"
    assert normalize_answer("The Cat, sat!", remove_articles=True) == "cat sat"


def test_exact_match():
    assert exact_match("Cat.", ["cat"]) == 100.0
    assert exact_match("cat", "CAT!") == 100.0  # a single reference may be a plain string
    # SNI's normalisation does not drop articles, unlike SQuAD's.
    assert exact_match("The Cat.", ["cat"]) == 0.0
    assert exact_match("The Cat.", ["cat"], remove_articles=True) == 100.0
    assert exact_match("dog", ["cat", "Dog!"]) == 100.0  # max over references
    assert exact_match("dogs", ["dog"]) == 0.0
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 tokens of 6 each -> F = 5/6.
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    # Stemming: "cats" ~ "cat". LCS = 2, P = 2/4, R = 2/2 -> F = 2/3. Case and punctuation are ignored.
    assert rouge_l("Cats eat fish daily.", ["cat FISH"]) == pytest.approx(100 * 2 / 3)
    assert rouge_l("a b", ["c d", "a b"]) == pytest.approx(100.0)  # max over references
    assert rouge_l("", ["anything"]) == 0.0
    assert rouge_l("x y", "y z") == pytest.approx(50.0)  # LCS 1 of 2 and 2 -> P = R = F = 1/2


def test_compute_sni_metrics():
    preds = ["cat.", "the cat sat on the mat", "x"]
    refs = [["Cat"], ["the cat is on the mat"], ["y", "z"]]
    result = compute_sni_metrics(preds, refs, task_names=["t1", "t2", "t2"], categories=["c", "c", "c"])
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["rougeL"] == pytest.approx((100 + 500 / 6 + 0) / 3)
    assert result["n"] == 3
    assert set(result["per_task"]) == {"t1", "t2"}
    assert result["per_task"]["t1"] == pytest.approx({"exact_match": 100.0, "rougeL": 100.0, "n": 1})
    assert result["per_task"]["t2"] == pytest.approx({"exact_match": 0.0, "rougeL": 250 / 6, "n": 2})
    assert result["per_category"]["c"]["rougeL"] == pytest.approx(result["rougeL"])
    assert compute_sni_metrics(preds, refs)["per_task"] == {}


def test_compute_sni_metrics_errors():
    with pytest.raises(ValueError, match="predictions"):
        compute_sni_metrics(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="task_names"):
        compute_sni_metrics(["a"], [["a"]], task_names=["t", "u"])
    with pytest.raises(ValueError):
        compute_sni_metrics([], [])


def test_rank_classification_accuracy():
    scores = [[0.1, 0.9], [-1.0, -2.0, -3.0], [5.0, 5.0], [0.0, 1.0, 2.0, 3.0]]
    # Row 3 ties: argmax semantics pick option 0, so gold 1 is wrong.
    assert rank_classification_accuracy(scores, [1, 0, 1, 3]) == pytest.approx(75.0)
    assert rank_classification_accuracy(scores, [0, 1, 0, 0]) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="out of range"):
        rank_classification_accuracy([[0.0, 1.0]], [2])
    with pytest.raises(ValueError):
        rank_classification_accuracy([[0.0]], [0, 0])


def test_choice_log_likelihoods_uniform_by_hand():
    logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens: every scored token contributes log(1/4)
    labels = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    out = choice_log_likelihoods(logits, labels)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(2 * math.log(0.25))
    assert out[1].item() == 0.0
    mean = choice_log_likelihoods(logits, labels, length_normalize=True)
    assert mean[0].item() == pytest.approx(math.log(0.25))


def test_choice_log_likelihoods_matches_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (3, 5), generator=generator)
    labels[0, 3:] = -100
    labels[2, 0] = -100
    expected = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(-1)
    torch.testing.assert_close(choice_log_likelihoods(logits, labels), expected)
    # bf16 inputs are scored in float32.
    assert choice_log_likelihoods(logits.bfloat16(), labels).dtype == torch.float32


def test_choice_log_likelihoods_ignores_inf_at_masked_positions():
    logits = torch.zeros(1, 2, 3)
    logits[0, 1, 0] = -math.inf  # token 0 impossible at t=1, but t=1 is not scored
    out = choice_log_likelihoods(logits, torch.tensor([[1, -100]]))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="Expected logits"):
        choice_log_likelihoods(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_modules_give_the_numbers_of_the_functions():
    import evaluate

    from peft_tagi.metric_modules import rank_classification_metric, sni_metric

    predictions = ["The cat sat.", "dog", "a red tree", "running fast", ""]
    references = [["the cat sat"], ["Dog!", "a dog"], ["red trees"], ["they ran fast"], ["x"]]
    tasks = ["t1", "t2", "t1", "t2", "t3"]
    categories = ["c", "c", "d", "d", "d"]
    metric = sni_metric()
    assert isinstance(metric, evaluate.EvaluationModule)
    expected = compute_sni_metrics(predictions, references, tasks, categories)
    assert metric.compute(predictions=predictions, references=references, task_names=tasks,
                          categories=categories) == expected  # fmt: skip
    # accumulated in batches, and with one reference string per instance
    for start in (0, 2, 4):
        metric.add_batch(predictions=predictions[start : start + 2], references=references[start : start + 2])
    assert metric.compute() == compute_sni_metrics(predictions, references)
    single = [refs[0] for refs in references]
    assert sni_metric().compute(predictions=predictions, references=single) == compute_sni_metrics(predictions, single)

    # float64 features: a near-tie decided by 1e-12 ranks as in the plain function (float32 would round it away)
    scores = [[-1.0, -1.0 + 1e-12], [0.5, 0.2, 0.9], [-3.0, -3.0]]
    gold = [1, 2, 1]
    result = rank_classification_metric().compute(predictions=scores, references=gold)
    assert result == {"accuracy": rank_classification_accuracy(scores, gold)}
    assert result["accuracy"] == pytest.approx(200 / 3)


def test_evaluate_modules_load_offline_in_a_fresh_process(tmp_path):
    from conftest import run_python

    # HF_HUB_OFFLINE=1 (set by run_python) and an empty HF cache: nothing can come from the Hub.
    code = f"""
import os
os.environ["HF_HOME"] = {str(tmp_path / "hf")!r}
import evaluate
from peft_tagi.metric_modules import rank_classification_metric, sni_metric
m = sni_metric()
assert isinstance(m, evaluate.EvaluationModule), type(m)
print(m.compute(predictions=["cat dog"], references=[["cat dog"]])["exact_match"],
      rank_classification_metric().compute(predictions=[[0.1, 0.9]], references=[1])["accuracy"])
"""
    assert run_python(code).stdout.split() == ["100.0", "100.0"]
