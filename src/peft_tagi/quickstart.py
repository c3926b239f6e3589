"""`peft-tagi quickstart`: the whole TAGI pipeline on the embedded default, with a report on held-out tasks.

The small BART shipped in the package is loaded as the frozen base (`embedded_base`; or, `base_model="from-scratch"`, a
small T5 is built from random weights and pretrained on the synthetic suite's plain text), the instructions are read
by a pretrained sentence encoder (MiniLM, `instruction_encoder="minilm"`; None: the base model's own encoder), then
the paper's three stages train (`pipeline.train_stage`: teachers -> hypernetwork pretraining -> distillation), and
five rows are scored on held-out tasks that no stage has seen, worded with the evaluation-only paraphrases: the frozen
base, the meta-train teacher, TAGI, TAGI's adapters exported as plain LoRA, and a task-LoRA oracle. Beside them the
report checks that TAGI follows the instruction it is given (`instruction_swap`), how it does on training tasks
(`training_tasks`), and what each paraphrase family costs (`wording`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM
from transformers.utils import logging

from .config import TagiConfig
from .data.pretraining import pretraining_dataset
from .data.synthetic import SyntheticSuite, suite_tokenizer
from .embedded_base import (
    EMBEDDED_BASE_DIR,
    RECIPE_NAME,
    TARGET_MODULES,
    EmbeddedBaseConfig,
    build_base_model,
    demonstration_texts,
    load_embedded_base,
    pretrain_base,
)
from .instruction_encoder import InstructionEncoder
from .pipeline import (
    generate_outputs,
    group_by_instruction,
    score,
    serve_by_instruction,
    tagi_model,
    train_stage,
    training_arguments,
    write_report,
)
from .teachers import load_teachers, read_teachers_index
from .tokenizer import unknown_words

logger = logging.get_logger(__name__)

ROWS = (
    ("base", "frozen base, no adapter"),
    ("meta_teacher", "meta-train teacher (instruction + input)"),
    ("tagi", "TAGI generated adapter (fusion)"),
    ("tagi_plain_lora", "TAGI adapter exported, loaded as plain LoRA"),
    ("oracle", "task-LoRA oracle (held-out task's own instances)"),
)
BASE_MODELS = ("from-scratch", "embedded")
# With an instruction encoder, three quarters of the training instructions are reworded in free wordings drawn from
# six phrasings per step and six templates. Chosen on 12 left-out training tasks over seeds 0-2
# (bench/results/encoder_validation.json): the open-vocabulary family kept 93 % / 88 % of the training wordings'
# ROUGE-L / exact match so, 86 % / 84 % with half reworded from three phrasings, 75 % / 58 % without free wordings;
# in vocabulary within noise of each other.
FREE_WORDINGS_WITH_ENCODER = 0.75
# Every row generates greedily, up to 16 tokens, all of one instruction's inputs in one batch.
GENERATION = {"batch_size": 64, "max_new_tokens": 16}


@dataclass
class QuickstartConfig:
    """Sizes and budgets of the quickstart. `fast()` gives the CI smoke run.

    Args:
        seed: seed of the suite split, the data and the model initialisations.
        base_model: `"embedded"` (default: the BART shipped in the package, `peft_tagi.embedded_base`, pretrained once
            for every split, so on single steps only) or `"from-scratch"` (a T5 of the shape below, pretrained inside
            the run for `base_steps` on text that holds the split's training instructions: the default before the
            shipped base; with `instruction_encoder=None` it reproduces that default). docs/quality.md, "The shipped
            base", has how the two compare.
        d_model, num_layers, num_heads, d_ff: shape of the from-scratch T5.
        base_steps, base_learning_rate: its pretraining.
        demonstrations: mix single-step demonstrations ("reverse the words: cat dog output: dog cat.") into the
            from-scratch base's pretraining text, the way web text shows simple operations. Only training phrasings
            of single steps appear; no composition, so no training or held-out task is ever shown solved.
        r, lora_alpha: rank and alpha of every LoRA (teachers, generated adapters, oracle).
        target_modules: linear layers that receive LoRA weights; None: all attention and feed-forward projections of
            the base's architecture (`embedded_base.TARGET_MODULES`).
        train_instances: training examples per training task (teachers and distillation).
        eval_instances: evaluation examples per held-out task.
        oracle_instances: training examples per held-out task for the oracle upper bound only.
        teacher_steps, pretrain_steps, distill_steps, oracle_steps: optimisation steps per stage.
        batch_size: examples per step.
        learning_rate: of every stage (AdamW, linear decay).
        instruction_fusion: whether the TAGI model cross-attends to the instruction.
        lambda_kl, lambda_ins, ins_reduction: distillation weights and the ΔW-alignment scale (see
            `TagiTrainingArguments`).
        group_by: the bank of parameter teachers: one LoRA per `"category"` (the task's first step, as the paper
            does per SNI category) or per `"task_name"`.
        validation_tasks: when > 0, a validation run for choosing settings: this many *training* tasks are removed
            from training and evaluated (with training wordings) instead of the held-out tasks, which such a run
            never touches. Settings are chosen this way so that nothing is tuned on the held-out tasks or on the
            evaluation-only paraphrases.
        instruction_encoder: `TagiConfig.instruction_encoder`: `"minilm"` (default) reads the instructions with a
            pretrained sentence encoder (extra [encoder]), whose vocabulary reaches words the quickstart's tokenizer
            does not know; None (or `"none"`) with the base model's encoder and its word tokenizer. On the shipped
            base TAGI learns only through MiniLM (docs/quality.md, "The shipped base").
        free_wordings: with an instruction encoder, the fraction of training examples whose instruction is reworded
            in words outside the suite's vocabulary (`SyntheticSuite.free_wording_examples`), so that the
            hypernetwork sees several wordings of every step, not only the suite's; the teachers keep reading the
            original wordings. Never the open-vocabulary evaluation family's words. None (default):
            `FREE_WORDINGS_WITH_ENCODER` with an instruction encoder, 0 without (`free_wording_fraction()`).
        free_wording_variety: how many phrasings of each step and sentence templates the free wordings draw from
            (the first ones of `FREE_WORDING_PHRASINGS` and `FREE_WORDING_TEMPLATES`).
        pooling, pooling_queries: `TagiConfig.pooling` and `TagiConfig.pooling_queries`: how the hypernetwork reads
            the encoded instruction (a mean; or learned queries, several of them able to read the steps apart).
        hypernetwork_hidden_size: `TagiConfig.hypernetwork_hidden_size`, the width of the hypernetwork's trunk.
    """

    seed: int = 0
    # The shipped BART read through MiniLM, chosen against the from-scratch T5 read by its own encoder on 12 left-out
    # training tasks over seeds 0-2 (bench/results/embedded_minilm_validation.json).
    base_model: str = "embedded"
    d_model: int = 128
    num_layers: int = 3
    num_heads: int = 4
    d_ff: int = 512
    base_steps: int = 1500
    base_learning_rate: float = 1e-3
    demonstrations: bool = True
    r: int = 16
    lora_alpha: float = 32
    target_modules: tuple[str, ...] | None = None
    train_instances: int = 200
    eval_instances: int = 30
    oracle_instances: int = 200
    # 750 / 150 teacher and hypernetwork-pretraining steps since the 12-minute budget was set (docs/quality.md).
    teacher_steps: int = 750
    pretrain_steps: int = 150
    # From the references alone (the paper's KL weight of 5 makes every step run the teacher too), 1300 steps (were
    # 1000, before that 750 with KL): the teacher stage no longer trains the bank no stage reads (teacher_loras), and
    # its time buys the extra steps. Chosen on 12 left-out training tasks over seeds 0-2 against 1000 and 1600
    # (bench/results/validation_distill_1300.json): exact match higher than 1000 on every seed; 1600 no better on the
    # mean (one seed fell) and longer; docs/quality.md, "More distillation steps". TagiTrainingArguments keeps KL 5.
    distill_steps: int = 1300
    oracle_steps: int = 200
    batch_size: int = 32
    learning_rate: float = 3e-3
    instruction_fusion: bool = True
    lambda_kl: float = 0.0
    # Chosen on left-out training tasks (validation_tasks=12, 3 seeds, bench/results/ablation_seeds.json): with the
    # per-entry L_ins, training without ΔW alignment scored 0.6 ± 0.3 ROUGE-L higher than the paper's "sigmoid", on
    # every seed (within noise); the trainer's default keeps the paper's "sigmoid".
    lambda_ins: str | float = 0.0
    ins_reduction: str = "mean"
    validation_tasks: int = 0
    group_by: str = "category"
    instruction_encoder: str | None = "minilm"
    free_wordings: float | None = None
    free_wording_variety: int = 6
    pooling: str = "mean"
    pooling_queries: int = 1
    hypernetwork_hidden_size: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.instruction_encoder, str) and self.instruction_encoder.lower() == "none":
            self.instruction_encoder = None  # as the command line and config files spell it
        if self.free_wordings and self.instruction_encoder is None:
            raise ValueError(
                f"QuickstartConfig.free_wordings={self.free_wordings} rewords training instructions in words the "
                "quickstart's word tokenizer does not know: it needs instruction_encoder (e.g. 'minilm'), or set "
                "free_wordings=0."
            )
        if self.base_model not in BASE_MODELS:
            raise ValueError(
                f"QuickstartConfig.base_model must be one of {list(BASE_MODELS)}, got {self.base_model!r}."
            )
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        # TagiConfig's own checks of the hypernetwork's reading, now rather than after the base is pretrained.
        TagiConfig(task_type="SEQ_2_SEQ_LM", pooling=self.pooling, pooling_queries=self.pooling_queries)

    @classmethod
    def fast(cls, **overrides) -> QuickstartConfig:
        """A smoke run (CI): every step of the pipeline, with budgets far too small to learn much; `overrides` are
        further fields (e.g. `base_model="from-scratch"`)."""
        smoke = dict(
            d_model=64, num_layers=2, d_ff=128, r=8, lora_alpha=16, train_instances=8, eval_instances=4,
            oracle_instances=8, base_steps=40, teacher_steps=20, pretrain_steps=10, distill_steps=20, oracle_steps=10,
            batch_size=16,
        )  # fmt: skip
        return cls(**{**smoke, **overrides})

    def free_wording_fraction(self) -> float:
        """The fraction of training instructions reworded in free wordings (`free_wordings`, None resolved)."""
        if self.free_wordings is not None:
            return self.free_wordings
        return FREE_WORDINGS_WITH_ENCODER if self.instruction_encoder is not None else 0.0

    def distillation_losses(self) -> dict[str, str | float]:
        """The distillation stage's loss weights as `TagiTrainingArguments` fields (whose own defaults are the
        paper's, not the quickstart's): the one place the quickstart and its Python-API example read them from."""
        return {"lambda_kl": self.lambda_kl, "lambda_ins": self.lambda_ins, "ins_reduction": self.ins_reduction}

    def teacher_loras(self) -> str:
        """What the teacher stage trains (`TagiTrainingArguments.teacher_loras`): the meta-train LoRA always (the
        report's teacher row, the logit teacher of `lambda_kl`), the bank only when distillation aligns ΔW to it
        (`lambda_ins`); no other stage reads the bank, and its pass is about half the stage's time."""
        return "both" if self.lambda_ins else "meta"

    def base(self) -> EmbeddedBaseConfig:
        """The architecture, shape and pretraining budget of a from-scratch base."""
        return EmbeddedBaseConfig(
            seed=self.seed, architecture="t5", d_model=self.d_model, num_layers=self.num_layers,
            num_heads=self.num_heads, d_ff=self.d_ff, base_steps=self.base_steps,
            base_learning_rate=self.base_learning_rate, batch_size=self.batch_size,
        )  # fmt: skip


def stage_arguments(output_dir: Path, name: str, steps: int, config: QuickstartConfig, **options):
    """The quickstart's arguments of one training run, written under `output_dir / name`; the stage is `name` unless
    `stage=` is given."""
    options.setdefault("stage", name)
    return training_arguments(
        output_dir / name,
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        **options,
    )


def serve_row(
    examples: list[dict],
    tokenizer,
    model: torch.nn.Module | Callable[[str], torch.nn.Module],
    context: Callable[[str, str], contextlib.AbstractContextManager] | None = None,
    reads_instruction: bool = False,
) -> tuple[dict, list[str]]:
    """Score one report row on `examples`, served one instruction at a time (all of its inputs in one batch).

    Args:
        model: the model, or instruction -> the model that serves it.
        context: (instruction, task name) -> the context to generate in (e.g. applied task weights).
        reads_instruction: the model reads "instruction\ninput" (the meta-train teacher); otherwise the input alone.

    Returns:
        `score(...)` plus `ms_per_instance` (the time per example with the set-up of each instruction included), and
        the predictions.
    """
    predictions = [""] * len(examples)
    start = time.perf_counter()
    for instruction, rows in group_by_instruction(examples).items():
        texts = [f"{instruction}\n{examples[i]['input']}" if reads_instruction else examples[i]["input"] for i in rows]
        served = model(instruction) if callable(model) and not isinstance(model, torch.nn.Module) else model
        task = examples[rows[0]]["task_name"]
        ctx = (lambda: context(instruction, task)) if context else contextlib.nullcontext  # noqa: B023
        for i, text in zip(rows, generate_outputs(served, tokenizer, texts, context=ctx, **GENERATION)):
            predictions[i] = text
    seconds = time.perf_counter() - start
    return {**score(predictions, examples), "ms_per_instance": 1000.0 * seconds / max(1, len(examples))}, predictions


def serve_tagi(model, tokenizer, examples: list[dict], adapters: dict) -> tuple[dict, list[str]]:
    """TAGI's row on `examples` (adapters generated once per instruction, kept in `adapters`) and its predictions."""
    start = time.perf_counter()
    predictions = serve_by_instruction(model, tokenizer, examples, adapters=adapters, **GENERATION)
    seconds = time.perf_counter() - start
    return {**score(predictions, examples), "ms_per_instance": 1000.0 * seconds / max(1, len(examples))}, predictions


@contextlib.contextmanager
def _unknown_word_warnings_off():
    tokenizer_logger = logging.get_logger("peft_tagi.tokenizer")
    level = tokenizer_logger.level
    tokenizer_logger.setLevel("ERROR")
    try:
        yield
    finally:
        tokenizer_logger.setLevel(level)


def wording_report(predictions: list[str], examples: list[dict], families: list[str], training: dict) -> dict:
    """TAGI's score per paraphrase family (`families[i]` is the family of `examples[i]`), their mean, and the
    fraction of `training` (TAGI's score on the same examples with training wordings) that the mean reaches."""
    per_family = {}
    for family in dict.fromkeys(families):
        rows = [i for i, f in enumerate(families) if f == family]
        per_family[family] = score([predictions[i] for i in rows], [examples[i] for i in rows])
    metrics = ("rougeL", "exact_match")
    mean = {m: sum(s[m] for s in per_family.values()) / len(per_family) for m in metrics}
    return {
        "families": {f: {m: s[m] for m in metrics} for f, s in per_family.items()},
        "families_mean": mean,
        "training_wordings": {m: training[m] for m in metrics},
        "fraction_of_training_wordings": mean["rougeL"] / training["rougeL"] if training["rougeL"] else 0.0,
    }


def evaluate_rows(
    model: PeftModel,
    fresh_base: Callable[[], torch.nn.Module],
    tokenizer,
    examples: list[dict],
    teachers_dir: Path,
    oracle_dir: Path,
    work_dir: Path,
    swapped: list[dict] | None = None,
    training_examples: list[dict] | None = None,
    families: list[str] | None = None,
    training_wordings: list[dict] | None = None,
    step_order: list[dict] | None = None,
    shuffled: list[dict] | None = None,
    open_vocabulary: list[dict] | None = None,
    random_instruction: list[dict] | None = None,
) -> dict:
    """Score the five report rows on held-out examples, and the instruction-following and training-task checks.

    Every row serves the examples the same way, one task instruction at a time (all of its inputs in one batch), so
    the per-instance times compare like for like; TAGI's time includes generating the adapter once per instruction.

    `swapped`: each held-out task's inputs under another held-out task's instruction, with `references` from the
    given instruction and `own_references` from the inputs' own task; TAGI is scored against both
    (`results["instruction_swap"]`). `training_examples`: examples of training tasks (training wordings), on which
    the meta-train teacher and TAGI are scored (`results["training_tasks"]`) to show whether the model under-fits.
    `families`: the paraphrase family of each example, for TAGI's score per family (`results["wording"]`), next to
    its score on `training_wordings` (the same examples with training wordings of their tasks).

    Whether the instruction is read as a sentence, for TAGI and the meta-train teacher: `step_order`, the examples
    under their task's steps in the other order (`SyntheticSuite.step_order_examples`), scored against the requested
    and the original order (`results["step_order"]`); `shuffled`, the examples with their instruction's words in a
    random order (`results["shuffled_words"]`); `random_instruction`, a random string of words in their place
    (`results["random_instruction"]`, TAGI). `open_vocabulary`: the examples worded in words outside the suite's
    vocabulary (`SyntheticSuite.open_vocabulary_examples`), TAGI's score next to its score with training wordings
    (`results["open_vocabulary"]`).
    """
    tagi = model.base_model
    with model.disable_adapter():  # warm-up, so that the first timed row pays no one-off costs
        generate_outputs(model, tokenizer, [e["input"] for e in examples[:8]], **GENERATION)

    results = {"base": serve_row(examples, tokenizer, model, context=lambda *_: model.disable_adapter())[0]}

    meta, _, _ = load_teachers(teachers_dir)
    meta_weights = tagi.task_weights_from_adapter(meta, fusion=False)

    def meta_teacher(on: list[dict]) -> tuple[dict, list[str]]:
        context = lambda *_: tagi.apply_task_weights(meta_weights)  # noqa: E731
        return serve_row(on, tokenizer, model, context=context, reads_instruction=True)

    results["meta_teacher"] = meta_teacher(examples)[0]

    adapters: dict = {}
    results["tagi"], tagi_predictions = serve_tagi(model, tokenizer, examples, adapters)
    # TAGI on the same examples under their tasks' training wordings: the reference of the wording and
    # open-vocabulary reports (without them, the examples' own wordings are the reference).
    training = results["tagi"]
    if training_wordings is not None:
        training = serve_tagi(model, tokenizer, training_wordings, adapters)[0]
        if families is not None:
            results["wording"] = wording_report(tagi_predictions, examples, families, training)
    held_out_adapters = {e["instruction"]: adapters[e["instruction"]] for e in examples}
    if swapped:
        given, predictions = serve_tagi(model, tokenizer, swapped, adapters)
        own = [{**e, "references": e["own_references"]} for e in swapped]
        results["instruction_swap"] = {
            "given_instruction": given,
            "own_task": {**score(predictions, own), "ms_per_instance": given["ms_per_instance"]},
        }
    if step_order:
        # Each requested (swapped) order against the original one, for TAGI and for the teacher it distils.
        results["step_order"] = {"n": len(step_order)}
        for name, (_, predictions) in (
            ("tagi", serve_tagi(model, tokenizer, step_order, adapters)),
            ("meta_teacher", meta_teacher(step_order)),
        ):
            own = [{**e, "references": e["own_references"]} for e in step_order]
            results["step_order"][name] = {
                "requested": score(predictions, step_order),
                "original": score(predictions, own),
            }
    if shuffled:
        results["shuffled_words"] = {
            "tagi": serve_tagi(model, tokenizer, shuffled, adapters)[0],
            "meta_teacher": meta_teacher(shuffled)[0],
        }
    if random_instruction:
        results["random_instruction"] = {"tagi": serve_tagi(model, tokenizer, random_instruction, adapters)[0]}
    if open_vocabulary:
        # Unknown words are the point of this family: one line for it, not a warning per instruction.
        with _unknown_word_warnings_off():
            open_row = serve_tagi(model, tokenizer, open_vocabulary, adapters)[0]
        reader = tagi.instruction_tokenizer or tokenizer
        unknown = sorted({w.lower() for e in open_vocabulary for w in unknown_words(reader, e["instruction"])})
        logger.info(
            f"quickstart: the open-vocabulary family has {len(unknown)} words the instruction tokenizer does not know"
            + (f" ({', '.join(unknown[:8])}, ...)" if unknown else "")
        )
        results["open_vocabulary"] = {
            "tagi": open_row,
            "training_wordings": training,
            "fraction_of_training_wordings": {
                metric: _ratio(open_row[metric], training[metric]) for metric in ("rougeL", "exact_match")
            },
        }
    if training_examples:
        results["training_tasks"] = {
            "meta_teacher": meta_teacher(training_examples)[0],
            "tagi": serve_tagi(model, tokenizer, training_examples, adapters)[0],
        }

    # The same adapters exported as standard LoRA folders and loaded by plain peft (fusion dropped); loading is not
    # timed, serving is.
    plain_models = {}
    for n, (instruction, adapter) in enumerate(held_out_adapters.items()):
        folder = adapter.save_lora(work_dir / "exported" / f"task_{n}", overwrite=True)
        plain_models[instruction] = PeftModel.from_pretrained(fresh_base(), folder).eval()
    results["tagi_plain_lora"] = serve_row(examples, tokenizer, plain_models.__getitem__)[0]

    _, oracle_bank, _ = load_teachers(oracle_dir)
    oracle_weights = {task: tagi.task_weights_from_adapter(a, fusion=False) for task, a in oracle_bank.items()}
    results["oracle"] = serve_row(
        examples, tokenizer, model, context=lambda _, task: tagi.apply_task_weights(oracle_weights[task])
    )[0]
    return results


# What the base pretraining, the teachers and the oracle read from the config: runs that agree on these (and differ
# only in the hypernetwork's stages, e.g. ablation variants) can share those three stages (`reuse_from`).
SHARED_STAGE_FIELDS = (
    "seed", "base_model", "d_model", "num_layers", "num_heads", "d_ff", "r", "lora_alpha", "target_modules", "train_instances",
    "oracle_instances", "base_steps", "teacher_steps", "oracle_steps", "batch_size", "base_learning_rate",
    "learning_rate", "validation_tasks", "group_by", "demonstrations",
)  # fmt: skip


def check_reusable(folder: Path, config: QuickstartConfig) -> dict:
    """The results of the finished quickstart in `folder`, if its base model, teachers and oracle are what `config`
    would train (it agrees on `SHARED_STAGE_FIELDS`); otherwise an error that names the settings that differ."""
    report = folder / "results.json"
    if not report.is_file():
        raise FileNotFoundError(f"reuse_from={str(folder)!r} holds no finished quickstart ({report} is missing).")
    earlier = json.loads(report.read_text())
    ours = asdict(config)
    differ = [f for f in SHARED_STAGE_FIELDS if json.dumps(earlier["config"].get(f)) != json.dumps(ours[f])]
    if differ:
        raise ValueError(
            f"reuse_from={str(folder)!r} was trained with other settings for {differ} "
            f"({ {f: earlier['config'].get(f) for f in differ} } there, { {f: ours[f] for f in differ} } here): its "
            "base model, teachers and oracle are not this run's. Train them (drop reuse_from) or match the settings."
        )
    if config.teacher_loras() == "both" and not read_teachers_index(folder / "work" / "teachers" / "teachers")["bank"]:
        raise ValueError(
            f"reuse_from={str(folder)!r} trained no bank of parameter teachers (its distillation did not align ΔW), "
            f"and this run's lambda_ins={config.lambda_ins!r} needs one. Train the teachers (drop reuse_from)."
        )
    return earlier


def split_tasks(suite: SyntheticSuite, validation_tasks: int = 0) -> tuple[list, list]:
    """(tasks to train on, tasks to evaluate): the suite's training and held-out tasks, or, with `validation_tasks`
    > 0, the training tasks minus that many left out for validation (every k-th one, so that they spread over the
    primitives) and those left-out tasks; the held-out tasks are then not returned at all."""
    train_tasks = suite.train_tasks()
    if not validation_tasks:
        return train_tasks, suite.heldout_tasks()
    left_out = train_tasks[:: max(1, len(train_tasks) // validation_tasks)][:validation_tasks]
    return [t for t in train_tasks if t not in left_out], left_out


def run_quickstart(
    output_dir: str | Path,
    config: QuickstartConfig | None = None,
    overwrite: bool = False,
    reuse_from: str | Path | None = None,
) -> dict:
    """Run the whole pipeline; write `results.json` and `results.png` to `output_dir` and return the results.

    `reuse_from`: a finished quickstart folder whose base model, teachers and oracle LoRAs this run loads instead of
    training them; its config must agree on `SHARED_STAGE_FIELDS` (else ValueError). Ablations use it so that their
    variants differ only in the stage they ablate, and pay for the shared stages once per seed.
    """
    config = config or QuickstartConfig()
    output_dir = Path(output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True (or --overwrite) to replace it.")
    if config.instruction_encoder is not None:
        try:
            InstructionEncoder(config.instruction_encoder)  # its config and tokenizer: refused now, before any stage
        except OSError as err:
            raise OSError(
                f"{err} The quickstart reads instructions with {config.instruction_encoder!r}; `--instruction-encoder "
                "none` (instruction_encoder=None) reads them with the base model's own encoder instead."
            ) from err
    reused = check_reusable(Path(reuse_from), config) if reuse_from is not None else None
    if reused is not None and Path(reuse_from).resolve() == output_dir.resolve():
        raise ValueError(
            "reuse_from must be another folder than output_dir (this run would overwrite what it reuses)."
        )
    work = output_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now
        logger.info(f"quickstart: {name} done in {timings[name]:.0f} s")

    suite = SyntheticSuite(seed=config.seed)
    tokenizer = suite_tokenizer(suite)
    train_tasks, eval_tasks = split_tasks(suite, config.validation_tasks)
    train_examples = suite.examples(train_tasks, config.train_instances, split="train", seed=config.seed)
    free_wordings = config.free_wording_fraction()
    if free_wordings:
        train_examples = suite.free_wording_examples(
            train_examples, free_wordings, seed=config.seed, variety=config.free_wording_variety
        )
    # "eval": held-out tasks in the evaluation-only wordings, validation tasks in their canonical training wordings.
    heldout_eval = suite.examples(eval_tasks, config.eval_instances, split="eval", seed=config.seed + 1)
    # The oracle's own training instances: inputs from another stream than the evaluation examples.
    oracle_train = suite.examples(eval_tasks, config.oracle_instances, split="train", seed=config.seed + 2)
    n_texts = max(4 * config.batch_size, 20000 if config.base_steps > 100 else 256)
    texts = suite.pretraining_texts(n_texts, seed=config.seed)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shared = Path(reuse_from) / "work" if reused is not None else work
    if reused is not None:
        base_final_loss = reused["base_pretraining_final_loss"]
    elif config.base_model == "embedded":
        # A copy in work/base, where `peft-tagi predict` and `demo` look, as for a base trained here.
        base, shipped_tokenizer, _ = load_embedded_base()
        if shipped_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                "The shipped base's vocabulary differs from the synthetic suite's: the base was made for another "
                "version of the suite. Rebuild it with `python -m peft_tagi.embedded_base --out src/peft_tagi/embedded`."
            )
        tokenizer = shipped_tokenizer  # the same words, truncating at the base's positions
        base.save_pretrained(work / "base")
        tokenizer.save_pretrained(work / "base")
        base_final_loss = json.loads((EMBEDDED_BASE_DIR / RECIPE_NAME).read_text())["final_loss"]
    else:
        logger.info(f"quickstart: pretraining the base model ({config.base_steps} steps)")
        base_texts = texts + (demonstration_texts(suite, n_texts, config.seed) if config.demonstrations else [])
        base = build_base_model(len(tokenizer), config.base()).to(device)
        base_losses = pretrain_base(base, tokenizer, base_texts, config.base())
        base.save_pretrained(work / "base")
        tokenizer.save_pretrained(work / "base")
        base_final_loss = sum(base_losses[-50:]) / max(1, len(base_losses[-50:]))
    lap("base pretraining" if config.base_model == "from-scratch" else "base model")

    def fresh_base():
        return AutoModelForSeq2SeqLM.from_pretrained(shared / "base").to(device).eval()

    # Seeded here, so that the hypernetwork's initialisation is the same whether the base was trained or reused.
    torch.manual_seed(config.seed)
    base_model = fresh_base()
    tagi_options = {
        "r": config.r, "lora_alpha": config.lora_alpha,
        "target_modules": list(config.target_modules or TARGET_MODULES[base_model.config.model_type]),
        "instruction_fusion": config.instruction_fusion, "instruction_encoder": config.instruction_encoder,
        "pooling": config.pooling, "pooling_queries": config.pooling_queries,
        "hypernetwork_hidden_size": config.hypernetwork_hidden_size,
    }  # fmt: skip
    model = tagi_model(base_model, **tagi_options)
    train_ds = datasets.Dataset.from_list(train_examples)

    if reused is None:
        args = stage_arguments(
            work, "teachers", config.teacher_steps, config, group_by=config.group_by,
            teacher_loras=config.teacher_loras(), overwrite_teachers=overwrite,
        )  # fmt: skip
        train_stage(model, tokenizer, args, train_ds)
    teachers_dir = shared / "teachers" / "teachers"
    lap("teachers")

    pretrain_ds = pretraining_dataset(datasets.Dataset.from_dict({"text": texts}), seed=config.seed)
    if config.pretrain_steps > 0:
        train_stage(model, tokenizer, stage_arguments(work, "pretrain", config.pretrain_steps, config), pretrain_ds)
    lap("hypernetwork pretraining")

    args = stage_arguments(work, "distill", config.distill_steps, config, **config.distillation_losses())
    train_stage(model, tokenizer, args, train_ds, teachers=teachers_dir)
    model.save_pretrained(work / "tagi", overwrite=overwrite)
    lap("distillation")

    if reused is None:
        args = stage_arguments(
            work, "oracle", config.oracle_steps, config, stage="teachers", teacher_loras="bank",
            overwrite_teachers=overwrite, run_name="oracle",
        )  # fmt: skip
        train_stage(tagi_model(fresh_base(), **tagi_options), tokenizer, args, oracle_train)
    oracle_dir = shared / "oracle" / "teachers"
    lap("oracle task LoRAs")

    model.eval()
    rows = evaluate_rows(
        model,
        fresh_base,
        tokenizer,
        heldout_eval,
        teachers_dir,
        oracle_dir,
        work,
        swapped=suite.instruction_swap_examples(heldout_eval),
        families=None if config.validation_tasks else [suite.paraphrase_family(e) for e in heldout_eval],
        training_wordings=None if config.validation_tasks else suite.training_wording_examples(heldout_eval),
        training_examples=suite.examples(
            train_tasks[:: max(1, len(train_tasks) // len(eval_tasks))][: len(eval_tasks)],
            config.eval_instances,
            split="eval",
            seed=config.seed + 1,
        ),
        step_order=suite.step_order_examples(heldout_eval),
        shuffled=suite.shuffled_instruction_examples(heldout_eval, seed=config.seed),
        open_vocabulary=suite.open_vocabulary_examples(heldout_eval),
        random_instruction=suite.random_instruction_examples(heldout_eval, seed=config.seed),
    )
    lap("evaluation")

    results = {
        "config": {**asdict(config), "free_wordings": free_wordings},  # as the run used it
        "evaluated_on": "validation (training tasks left out)" if config.validation_tasks else "held-out tasks",
        "eval_tasks": [t.name for t in eval_tasks],
        "num_train_tasks": len(train_tasks),
        "num_eval_examples": len(heldout_eval),
        "rows": {name: {"label": label, **rows[name]} for name, label in ROWS},
        "instruction_swap": rows["instruction_swap"],
        "training_tasks": rows["training_tasks"],
        **({"wording": rows["wording"]} if "wording" in rows else {}),
        "step_order": rows["step_order"],
        "shuffled_words": rows["shuffled_words"],
        "random_instruction": rows["random_instruction"],
        "open_vocabulary": rows["open_vocabulary"],
        "instruction_reading": instruction_reading(rows),
        "timings_s": timings,
        "base_pretraining_final_loss": base_final_loss,
        **({"reused_from": str(reuse_from)} if reused is not None else {}),
    }
    title = f"{results['evaluated_on']}: {results['num_eval_examples']} examples"
    write_report(output_dir, results, ROWS, title)
    return results


# Goals for reading the instruction as a sentence (exact match): the requested step order matched at least 3x as
# often as the original order and at half the held-out score or more; shuffled words at most a third of the score.
STEP_ORDER_OVER_ORIGINAL = 3.0
STEP_ORDER_OVER_HELD_OUT = 0.5
SHUFFLED_OVER_REAL = 1 / 3


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def instruction_reading(rows: dict) -> dict:
    """For TAGI and the meta-train teacher: the exact-match ratios of the step-order and shuffled-word controls to
    their references, and whether each meets its goal (None where a reference scored 0: no ratio to judge)."""
    out = {}
    for name in ("tagi", "meta_teacher"):
        order, real = rows["step_order"][name], rows[name]["exact_match"]
        ratios = {
            "requested_over_original": (
                _ratio(order["requested"]["exact_match"], order["original"]["exact_match"]),
                STEP_ORDER_OVER_ORIGINAL,
                ">=",
            ),
            "requested_over_held_out": (
                _ratio(order["requested"]["exact_match"], real),
                STEP_ORDER_OVER_HELD_OUT,
                ">=",
            ),
            "shuffled_over_real": (
                _ratio(rows["shuffled_words"][name]["exact_match"], real),
                SHUFFLED_OVER_REAL,
                "<=",
            ),
        }
        out[name] = {
            key: {
                "value": value,
                "goal": f"{sign} {goal:.3g}",
                "met": None if value is None else (value >= goal if sign == ">=" else value <= goal),
            }
            for key, (value, goal, sign) in ratios.items()
        }
        if out[name]["requested_over_original"]["value"] is None and order["requested"]["exact_match"] > 0:
            out[name]["requested_over_original"]["met"] = True  # the original order is never matched
    return out


def format_table(results: dict) -> str:
    """The report as a text table, with the instruction-following, training-task and wording lines."""
    lines = [f"{'row':<48} {'ROUGE-L':>8} {'EM':>7} {'ms/inst':>8}"]
    for name, label in ROWS:
        row = results["rows"][name]
        lines.append(f"{label:<48} {row['rougeL']:>8.1f} {row['exact_match']:>7.1f} {row['ms_per_instance']:>8.2f}")
    swap = results["instruction_swap"]
    lines.append(
        f"instruction swap (inputs of one task, another task's instruction): TAGI matches the given instruction at "
        f"{swap['given_instruction']['rougeL']:.1f} ROUGE-L, the inputs' own task at {swap['own_task']['rougeL']:.1f}"
    )
    train = results["training_tasks"]
    lines.append(
        f"training tasks (training wordings, unseen inputs): teacher {train['meta_teacher']['rougeL']:.1f} ROUGE-L / "
        f"{train['meta_teacher']['exact_match']:.1f} EM, TAGI {train['tagi']['rougeL']:.1f} / "
        f"{train['tagi']['exact_match']:.1f}"
    )
    if "wording" in results:
        wording = results["wording"]
        families = ", ".join(f"{f.split(':')[0]}: {s['rougeL']:.1f}" for f, s in wording["families"].items())
        lines.append(
            f"wording (TAGI, held-out tasks): evaluation-only families {families} (mean "
            f"{wording['families_mean']['rougeL']:.1f}); training wordings {wording['training_wordings']['rougeL']:.1f} "
            f"ROUGE-L ({100 * wording['fraction_of_training_wordings']:.0f} %)"
        )
    order, shuffled = results["step_order"], results["shuffled_words"]
    for name, label in (("tagi", "TAGI"), ("meta_teacher", "teacher")):
        lines.append(
            f"reads the instruction ({label}, exact match): steps asked in the other order: requested order "
            f"{order[name]['requested']['exact_match']:.1f}, original order {order[name]['original']['exact_match']:.1f} "
            f"({order['n']} inputs); words shuffled {shuffled[name]['exact_match']:.1f} against "
            f"{results['rows'][name]['exact_match']:.1f} for the real instructions"
        )
    random_row, open_vocabulary = results["random_instruction"]["tagi"], results["open_vocabulary"]
    lines.append(
        f"a random string of words in place of the instruction: TAGI {random_row['rougeL']:.1f} ROUGE-L / "
        f"{random_row['exact_match']:.1f} EM"
    )
    lines.append(
        f"words outside the vocabulary (open-vocabulary family): TAGI {open_vocabulary['tagi']['rougeL']:.1f} ROUGE-L / "
        f"{open_vocabulary['tagi']['exact_match']:.1f} EM, against {open_vocabulary['training_wordings']['rougeL']:.1f} / "
        f"{open_vocabulary['training_wordings']['exact_match']:.1f} with training wordings"
    )
    return "\n".join(lines)


__all__ = ["QuickstartConfig", "check_reusable", "format_table", "run_quickstart", "split_tasks"]
