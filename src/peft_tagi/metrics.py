"""Evaluation metrics: SNI's exact match and ROUGE-L, and P3's rank-classification accuracy.

SNI metrics reproduce the official evaluation of Super-NaturalInstructions (``eval/automatic/evaluation.py`` of
allenai/natural-instructions, identical to Tk-Instruct's ``compute_metrics.py`` on English tasks):

- exact match: SQuAD v1.1 normalisation **without removing articles** (the SNI script says so explicitly):
  lowercase, drop ``string.punctuation`` characters, collapse whitespace; then string equality. ``remove_articles=True``
  gives the SQuAD variant (also drops "a", "an", "the"), which SNI does not use.
- ROUGE-L: ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` on the *raw* strings (its default
  tokenizer lowercases, splits on non-alphanumerics and Porter-stems), F-measure.

Both take the maximum over an instance's references and are reported on a 0-100 scale, averaged over instances.
SNI's cross-lingual track scores ROUGE with the GPT-2 tokenizer; this module covers the English (default) track only,
on which the default tokenizer is what SNI uses (it drops non-ASCII text, so do not use it for other languages).

`peft_tagi.metric_modules.sni_metric()` and `rank_classification_metric()` wrap the same functions as Hugging Face
`evaluate` modules (defined in the package, so they load offline).
"""

from __future__ import annotations

import functools
import re
import string
from collections import defaultdict
from collections.abc import Sequence

import torch

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str, remove_articles: bool = False) -> str:
    """SNI's answer normalisation: lowercase, remove punctuation, collapse whitespace (articles kept by default)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    if remove_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("At least one reference is required.")
    return refs


def exact_match(prediction: str, references: str | Sequence[str], remove_articles: bool = False) -> float:
    """100.0 if the normalised prediction equals some normalised reference, else 0.0."""
    pred = normalize_answer(prediction, remove_articles)
    return 100.0 if any(pred == normalize_answer(ref, remove_articles) for ref in _as_references(references)) else 0.0


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    # Imported lazily: rouge_score pulls in nltk, which is slow to import and not needed for the rest of the package.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (0-100) of the prediction against its best-matching reference, as SNI computes it."""
    scorer = _rouge_l_scorer()
    return 100.0 * max(
        scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in _as_references(references)
    )


def _mean_metrics(pairs: list[tuple[str, list[str]]]) -> dict[str, float | int]:
    n = len(pairs)
    return {
        "exact_match": sum(exact_match(pred, refs) for pred, refs in pairs) / n,
        "rougeL": sum(rouge_l(pred, refs) for pred, refs in pairs) / n,
        "n": n,
    }


def compute_sni_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    task_names: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
) -> dict:
    """Mean exact match and ROUGE-L (0-100) over instances, overall and per task / category.

    Args:
        predictions: one generated string per instance.
        references: the acceptable outputs of each instance (a list per instance; max over them).
        task_names: optional task of each instance, for ``per_task``.
        categories: optional category of each instance, for ``per_category``.

    Returns:
        ``{"exact_match": float, "rougeL": float, "n": int, "per_task": {task: {"exact_match", "rougeL", "n"}}}``,
        plus ``"per_category"`` (same inner format) when `categories` is given. ``per_task`` is ``{}`` without
        `task_names`. Per-group scores average over that group's instances, as SNI's grouped metrics do.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    if not predictions:
        raise ValueError("No predictions to score.")
    for name, groups in (("task_names", task_names), ("categories", categories)):
        if groups is not None and len(groups) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(groups)} {name}.")

    pairs = [(pred, _as_references(refs)) for pred, refs in zip(predictions, references)]
    results: dict = _mean_metrics(pairs)

    def grouped(groups: Sequence[str]) -> dict[str, dict[str, float | int]]:
        by_group: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
        for pair, group in zip(pairs, groups):
            by_group[group].append(pair)
        return {group: _mean_metrics(group_pairs) for group, group_pairs in sorted(by_group.items())}

    results["per_task"] = grouped(task_names) if task_names is not None else {}
    if categories is not None:
        results["per_category"] = grouped(categories)
    return results


def rank_classification_accuracy(choice_scores: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Accuracy (0-100) of picking the highest-scoring answer option, as in T0's rank-classification evaluation.

    Args:
        choice_scores: per instance, one score per answer option (e.g. `choice_log_likelihoods`); instances may have
            different numbers of options.
        gold: per instance, the index of the correct option.

    Ties go to the first maximal option (``argmax`` semantics), which is deterministic but may favour option 0.
    """
    if len(choice_scores) != len(gold):
        raise ValueError(f"{len(choice_scores)} score lists but {len(gold)} gold labels.")
    if not gold:
        raise ValueError("No instances to score.")
    correct = 0
    for i, (scores, label) in enumerate(zip(choice_scores, gold)):
        scores = list(scores)
        if not 0 <= label < len(scores):
            raise ValueError(f"Instance {i}: gold index {label} out of range for {len(scores)} options.")
        correct += int(max(range(len(scores)), key=scores.__getitem__) == label)
    return 100.0 * correct / len(gold)


def choice_log_likelihoods(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, length_normalize: bool = False
) -> torch.Tensor:
    """Sequence log-likelihood of each row's labels: ``sum_t log p(labels[n, t] | ...)`` over non-ignored positions.

    Args:
        logits: ``(N, L, V)`` scores aligned with `labels` (seq2seq convention: ``logits[:, t]`` predicts
            ``labels[:, t]``). For a causal LM pass ``logits[:, :-1]`` and ``labels[:, 1:]``.
        labels: ``(N, L)`` target ids, `ignore_index` on padding / prompt positions.
        length_normalize: divide by the number of scored tokens (mean instead of sum). T0 uses the sum.

    Returns:
        ``(N,)`` float32 tensor; rows with no scored token get 0.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"Expected logits (N, L, V) and labels (N, L); got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    # float32 log-softmax: in bf16/fp16 the per-token log-probs lose enough precision to flip close rankings.
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != ignore_index
    token_log_probs = log_probs.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    # masked_fill, not a product: a -inf log-prob at an ignored position (e.g. a banned token) would give NaN.
    token_log_probs = token_log_probs.masked_fill(~mask, 0.0)
    totals = token_log_probs.sum(dim=-1)
    if length_normalize:
        totals = totals / mask.sum(dim=-1).clamp(min=1)
    return totals
