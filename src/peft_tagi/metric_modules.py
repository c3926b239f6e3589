"""`evaluate` modules of the package's metrics, defined in code so that they load offline (no Hub, no script cache).

`evaluate.load("rouge")` fetches a script from the Hub; these classes subclass `evaluate.Metric` directly, so
`sni_metric()` works with `HF_HUB_OFFLINE=1` and gives exactly the numbers of
`compute_sni_metrics` / `rank_classification_accuracy`, which do the arithmetic. `evaluate` only adds its
interface: `add_batch` / `add` accumulation, `compute(predictions=..., references=...)` and the module's info.
"""

from __future__ import annotations

import datasets
import evaluate

from .metrics import compute_sni_metrics, rank_classification_accuracy

_CITATION_SNI = """@inproceedings{wang2022super,
  title     = {Super-NaturalInstructions: Generalization via Declarative Instructions on 1600+ NLP Tasks},
  author    = {Wang, Yizhong and others},
  booktitle = {EMNLP},
  year      = {2022}
}"""
_CITATION_T0 = """@inproceedings{sanh2022multitask,
  title     = {Multitask Prompted Training Enables Zero-Shot Task Generalization},
  author    = {Sanh, Victor and others},
  booktitle = {ICLR},
  year      = {2022}
}"""


class SniMetric(evaluate.Metric):
    """SNI's exact match and ROUGE-L (0-100), mean over instances, optionally per task and per category.

    Inputs of `compute` / `add_batch`:
        predictions (`list[str]`): one generated string per instance.
        references (`list[list[str]]` or `list[str]`): the acceptable outputs of each instance (max over them).
    Keyword arguments of `compute`:
        task_names (`list[str]`, *optional*): task of each instance, for `per_task`.
        categories (`list[str]`, *optional*): category of each instance, for `per_category`.

    Returns what `peft_tagi.metrics.compute_sni_metrics` returns: `{"exact_match", "rougeL", "n", "per_task"}`
    (plus `"per_category"` with `categories`).
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description="Super-NaturalInstructions exact match and ROUGE-L (English track), as in peft-tagi.",
            citation=_CITATION_SNI,
            inputs_description=self.__doc__,
            # Several references per instance, or one string: evaluate picks the feature set that fits the input.
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://github.com/allenai/natural-instructions/tree/master/eval/automatic"],
        )

    def _compute(self, predictions, references, task_names=None, categories=None) -> dict:
        return compute_sni_metrics(predictions, references, task_names=task_names, categories=categories)


class RankClassificationMetric(evaluate.Metric):
    """T0's rank-classification accuracy (0-100): the highest-scoring answer option against the gold option.

    Inputs of `compute` / `add_batch`:
        predictions (`list[list[float]]`): per instance, one score per answer option (e.g. the options'
            log-likelihoods from `peft_tagi.metrics.choice_log_likelihoods`); instances may differ in option count.
        references (`list[int]`): per instance, the index of the correct option.

    Returns `{"accuracy": float}`; ties go to the first maximal option, as in `rank_classification_accuracy`.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description="Rank-classification accuracy over answer options (T0 evaluation), as in peft-tagi.",
            citation=_CITATION_T0,
            inputs_description=self.__doc__,
            # float64: the scores reach `_compute` unrounded, so near-ties rank exactly as in the plain function.
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        return {"accuracy": rank_classification_accuracy(predictions, references)}


def sni_metric(**kwargs) -> SniMetric:
    """SNI exact match and ROUGE-L as an `evaluate.EvaluationModule` that loads offline.

    `sni_metric().compute(predictions=[...], references=[[...], ...], task_names=[...])` returns exactly what
    `compute_sni_metrics` returns. `kwargs` go to `evaluate.EvaluationModule` (e.g. `experiment_id`,
    `num_process`/`process_id` for distributed evaluation); by default the module keeps its data in memory.
    """
    return SniMetric(**{"keep_in_memory": True, **kwargs})


def rank_classification_metric(**kwargs) -> RankClassificationMetric:
    """Rank-classification accuracy as an `evaluate.EvaluationModule` that loads offline.

    `rank_classification_metric().compute(predictions=choice_scores, references=gold)` returns
    `{"accuracy": rank_classification_accuracy(choice_scores, gold)}`. `kwargs` as in `sni_metric`.
    """
    return RankClassificationMetric(**{"keep_in_memory": True, **kwargs})


__all__ = ["RankClassificationMetric", "SniMetric", "rank_classification_metric", "sni_metric"]
