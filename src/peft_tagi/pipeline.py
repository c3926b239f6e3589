"""The steps of a TAGI pipeline, as one public library.

`peft-tagi quickstart`, the other `peft-tagi` commands, `examples/` and `bench/` are short programs over these steps;
none of them repeats a loop that lives here.

- **Models**: `load_base_model` (seq2seq or causal LM, read from its config, with its tokenizer) and `tagi_model` (a
  TAGI checkpoint on a base, or a fresh TAGI adapter); `load_tagi_model` does both.
- **Training**: `training_arguments` (one stage's `TagiTrainingArguments`), `train_stage` (one stage) and
  `run_stages` (teachers -> pretrain -> distill in one output folder, resumable).
- **Serving**: `generate_adapters` (one `TaskAdapter` per distinct instruction), `generate_outputs` (the one
  generation loop, in batches, under any context such as `use_adapter`) and `serve_by_instruction` (TAGI's way of
  serving: each instruction's adapter generated once, its inputs read alone, rows of many instructions per batch).
- **Scoring and reporting**: `score` (ROUGE-L and exact match, overall and per task) and `write_report` (a JSON file
  and a bar chart).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .adapter import TaskAdapter

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel

    from .arguments import StageArguments
    from .trainer import TagiTrainer, TagiTrainingArguments

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------- models
def load_base_model(
    name_or_path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, dtype: str | None = None
) -> tuple[torch.nn.Module, Any]:
    """A base model and its tokenizer from a Hub id or a local folder (seq2seq or causal LM, read from its config).

    Args:
        name_or_path: the model's Hub id or folder.
        tokenizer: the tokenizer's Hub id or folder; defaults to `name_or_path`.
        dtype: dtype the weights are loaded in (`"auto"`, `"bfloat16"`, ...); transformers' default when None.

    Returns:
        (model, tokenizer); a tokenizer without a pad token pads with its end-of-sequence token.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(name_or_path)
    auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto_class.from_pretrained(name_or_path, **({"dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer or name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def task_type_of(model: torch.nn.Module) -> str:
    """The PEFT task type of a transformers model: `"SEQ_2_SEQ_LM"` for encoder-decoders, else `"CAUSAL_LM"`."""
    return "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"


def tagi_model(
    base: torch.nn.Module, checkpoint: str | os.PathLike | None = None, trainable: bool = False, **config: Any
) -> PeftModel:
    """A TAGI model on `base`: a saved checkpoint (folder or Hub id), or a fresh adapter made from `config`.

    Args:
        base: the base model (from `load_base_model`).
        checkpoint: a TAGI checkpoint (`PeftModel.save_pretrained` of a TAGI model); None for a fresh adapter.
        trainable: load the checkpoint's hypernetwork trainable (peft's `is_trainable`); a fresh one always is.
        **config: `TagiConfig` options of a fresh adapter (`task_type` defaults to the base model's); with a
            checkpoint, its own saved config applies and options are refused.
    """
    from peft import PeftModel, get_peft_model

    from .config import TagiConfig

    if checkpoint is not None:
        if config:
            raise ValueError(
                f"TagiConfig options {sorted(config)} were given with the checkpoint {checkpoint}, whose saved "
                "config applies: drop them, or leave out the checkpoint to start a fresh adapter."
            )
        return PeftModel.from_pretrained(base, str(checkpoint), is_trainable=trainable)
    config.setdefault("task_type", task_type_of(base))
    return get_peft_model(base, TagiConfig(**config))


def load_tagi_model(
    base: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    trainable: bool = False,
    tokenizer: str | os.PathLike | None = None,
    dtype: str | None = None,
    **config: Any,
) -> tuple[PeftModel, Any]:
    """`load_base_model(base, tokenizer, dtype)` and `tagi_model` on it: (TAGI model, tokenizer)."""
    model, tokenizer = load_base_model(base, tokenizer=tokenizer, dtype=dtype)
    if checkpoint is None:
        config.setdefault("base_model_name_or_path", str(base))
    return tagi_model(model, checkpoint, trainable=trainable, **config), tokenizer


# ---------------------------------------------------------------------------------------------------- training
def training_arguments(
    output_dir: str | os.PathLike, stage: str, max_steps: int, **options: Any
) -> TagiTrainingArguments:
    """`TagiTrainingArguments` of one stage: warm-up over the first 2 % of the steps, ten log lines, no checkpoints
    and no reporting integrations unless `options` say otherwise (any `TagiTrainingArguments` field)."""
    from .trainer import TagiTrainingArguments

    defaults = {
        "warmup_steps": max(1, max_steps // 50),
        "logging_steps": max(1, max_steps // 10),
        "save_strategy": "no",
        "report_to": [],
    }
    return TagiTrainingArguments(
        output_dir=str(output_dir), stage=stage, max_steps=max_steps, **{**defaults, **options}
    )


def train_stage(
    model: PeftModel,
    tokenizer: Any,
    args: TagiTrainingArguments,
    train_dataset: datasets.Dataset | Sequence[dict],
    teachers: str | os.PathLike | None = None,
    eval_dataset: datasets.Dataset | None = None,
    resume_from_checkpoint: str | bool | None = None,
) -> TagiTrainer:
    """Train `model` in place for one stage (`args.stage`) and return its trainer.

    Args:
        model: the TAGI model.
        tokenizer: its tokenizer (the data collator's).
        args: the stage's arguments (`training_arguments`).
        train_dataset: examples of the one format (`task_name`, `instruction`, `input`, `output`, ...): a
            `datasets.Dataset` or a list of dicts.
        teachers: stage `distill`: the folder written by stage `teachers`.
        eval_dataset: evaluated when `args.eval_strategy` asks.
        resume_from_checkpoint: as in `Trainer.train`.
    """
    import datasets

    from .trainer import TagiTrainer

    if not isinstance(train_dataset, datasets.Dataset):
        train_dataset = datasets.Dataset.from_list(list(train_dataset))
    trainer = TagiTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        teachers=str(teachers) if teachers is not None else None,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def run_stages(
    model: PeftModel,
    tokenizer: Any,
    training_args: TagiTrainingArguments,
    stage_args: StageArguments,
    train_dataset: datasets.Dataset,
    pretrain_dataset: datasets.Dataset | None = None,
    eval_dataset: datasets.Dataset | None = None,
) -> TagiTrainer:
    """Train teachers -> pretrain -> distill, each in `<output_dir>/<stage>` with its checkpoints and final output.

    Layout of `training_args.output_dir`:

        teachers/   checkpoint-N/ ...; teachers/ (meta-train LoRA + bank LoRAs); trainer_state.json (stage complete)
        pretrain/   checkpoint-N/ ...; the TAGI checkpoint (adapter_config.json, adapter_model.safetensors); trainer_state.json
        distill/    checkpoint-N/ ...; the TAGI checkpoint; trainer_state.json

    A stage is complete once its folder holds `trainer_state.json`, written last (`Trainer.save_state`). With
    `resume_from_checkpoint` `true` complete stages are skipped (a skipped hypernetwork stage's weights are loaded,
    so the next stage starts where it ended) and the interrupted stage resumes from its newest complete checkpoint;
    `<output_dir>/<stage>/checkpoint-N` names the checkpoint instead.

    Args:
        model: the TAGI model (`load_tagi_model`); trained in place, stage after stage.
        tokenizer: its tokenizer (the collator's).
        training_args: the Trainer options shared by the stages; `stage`, `output_dir` and `max_steps` are set per
            stage from `<output_dir>/<stage>` and `stage_args`.
        stage_args: the steps of each stage (`peft_tagi.arguments.StageArguments`).
        train_dataset: examples for stages `teachers` and `distill`.
        pretrain_dataset: examples for stage `pretrain` (`peft_tagi.data.pretraining.pretraining_dataset`).
        eval_dataset: evaluated by the hypernetwork stages (`pretrain`, `distill`) when `--eval_strategy` asks.

    Returns:
        The trainer of the last hypernetwork stage that has steps (built even when that stage was already complete),
        for `evaluate()`.
    """
    from .arguments import resume_checkpoint
    from .trainer import STAGES, TagiTrainer, is_complete_checkpoint, last_complete_checkpoint

    resume = bool(training_args.resume_from_checkpoint)
    explicit = resume_checkpoint(training_args)
    output = Path(training_args.output_dir)
    teachers_dir = Path(training_args.teachers_output_dir or output / "teachers" / "teachers")
    hypernetwork_stages = [s for s in ("pretrain", "distill") if stage_args.steps(s) > 0]
    if not hypernetwork_stages:
        raise ValueError("--pretrain_steps and --distill_steps are both 0: nothing trains the hypernetwork.")
    if explicit and stage_args.steps(explicit[0]) == 0:
        raise ValueError(f"--resume_from_checkpoint names a {explicit[0]} checkpoint but --{explicit[0]}_steps is 0.")
    datasets_by_stage = {"teachers": train_dataset, "pretrain": pretrain_dataset, "distill": train_dataset}
    trainer, trained = None, False
    for stage in STAGES:
        steps = stage_args.steps(stage)
        if steps == 0:
            logger.info(f"Stage {stage}: skipped (--{stage}_steps 0).")
            continue
        if datasets_by_stage[stage] is None:
            raise ValueError(f"Stage {stage} has {steps} steps but no dataset; pass pretrain_dataset= or set 0 steps.")
        stage_dir = output / stage
        args = dataclasses.replace(
            training_args,
            stage=stage,
            output_dir=str(stage_dir),
            max_steps=steps,
            resume_from_checkpoint=None,
            teachers_output_dir=str(teachers_dir) if stage == "teachers" else training_args.teachers_output_dir,
        )
        if trained and stage_dir.is_dir() and any(stage_dir.iterdir()):
            # Its output was made from the earlier stage's old result, which this run has just replaced.
            raise FileExistsError(
                f"Stage {stage}: {stage_dir} holds output of an earlier run, but a stage before it was trained again "
                "now; delete that folder so that the stage trains from the new result."
            )
        done = resume and is_complete_checkpoint(stage_dir)
        if done and explicit and explicit[0] == stage:
            raise ValueError(
                f"--resume_from_checkpoint names {explicit[1]}, but stage {stage} already finished "
                f"({stage_dir}/trainer_state.json); delete that file to train the stage again from the checkpoint."
            )
        if done:
            logger.info(f"Stage {stage}: complete in {stage_dir}; skipped.")
            if stage != "teachers":
                # The next stage starts from this stage's hypernetwork, as it would have in one uninterrupted run.
                model.load_adapter(str(stage_dir), model.active_adapter, is_trainable=True)
            if stage != hypernetwork_stages[-1]:
                continue
        checkpoint = None
        if not done and explicit and explicit[0] == stage:
            checkpoint = str(explicit[1])
        elif not done and resume:
            checkpoint = last_complete_checkpoint(stage_dir)
        if checkpoint:
            logger.info(f"Stage {stage}: resuming from {checkpoint}.")
        trainer = TagiTrainer(
            model=model,
            args=args,
            train_dataset=datasets_by_stage[stage],
            eval_dataset=eval_dataset if stage != "teachers" else None,
            processing_class=tokenizer,
            teachers=str(teachers_dir) if stage == "distill" else None,
        )
        if done:
            break
        logger.info(f"Stage {stage}: {steps} steps into {stage_dir}.")
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trained = True
        if stage != "teachers":
            trainer.save_model()  # the teachers stage's output is its LoRA folders, written by train()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()  # written last: marks the stage complete
        trainer.accelerator.wait_for_everyone()  # the next stage reads what the main process wrote
    return trainer


# ---------------------------------------------------------------------------------------------------- serving
def generate_adapters(
    model: PeftModel,
    tokenizer: Any,
    instructions: Sequence[str],
    generator: str | None = None,
    base_model_name_or_path: str | None = None,
    adapters: dict[str, TaskAdapter] | None = None,
) -> dict[str, TaskAdapter]:
    """One `TaskAdapter` per distinct instruction text (`TaskAdapter.from_instruction`, which names unknown words).

    Args:
        model: the TAGI model.
        tokenizer: its tokenizer.
        instructions: instruction texts, repeated or not.
        generator, base_model_name_or_path: recorded in every adapter (the TAGI checkpoint and the base model).
        adapters: adapters generated before, by instruction: reused, and the new ones are added to it.

    Returns:
        `adapters` (or a new dict): instruction -> its adapter.
    """
    adapters = {} if adapters is None else adapters
    for instruction in dict.fromkeys(instructions):
        if instruction not in adapters:
            adapters[instruction] = TaskAdapter.from_instruction(
                model, tokenizer, instruction, generator=generator, base_model_name_or_path=base_model_name_or_path
            )
    return adapters


def generate_outputs(
    model: torch.nn.Module,
    tokenizer: Any,
    inputs: Sequence[str],
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    progress: bool | None = None,
) -> list[str]:
    """Generate one output string per input, in batches: the one generation loop of the project.

    Args:
        model: a generation model (a TAGI or LoRA `PeftModel`, or a plain transformers model).
        tokenizer: its tokenizer.
        inputs: the task inputs (without the instruction: the adapter carries it).
        context: entered around every `generate` call, e.g. `lambda: model.use_adapter(adapter)` or
            `model.disable_adapter` (the frozen base model).
        batch_size: inputs per `generate` call.
        max_new_tokens, num_beams: generation options (greedy when `num_beams=1`).
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
            batch = list(inputs[start : start + batch_size])
            encoding = tokenizer(batch, return_tensors="pt", padding=True, truncation=True).to(device)
            with torch.no_grad(), context():
                ids = model.generate(**encoding, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
            if is_causal:
                ids = ids[:, encoding["input_ids"].shape[1] :]
            outputs.extend(text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def group_by_instruction(examples: Sequence[dict]) -> dict[str, list[int]]:
    """Indices of `examples` per distinct `instruction`, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example["instruction"], []).append(i)
    return groups


def serve_by_instruction(
    model: PeftModel,
    tokenizer: Any,
    examples: Sequence[dict],
    adapters: dict[str, TaskAdapter] | None = None,
    **generation: Any,
) -> list[str]:
    """TAGI's outputs for `examples`: each distinct instruction's adapter generated once, its inputs read alone.

    A batch holds inputs of several instructions, each row under its own adapter
    (`TagiModel.task_weights_from_adapters`); the outputs are those of serving every instruction on its own.

    Args:
        model: the TAGI model.
        tokenizer: its tokenizer.
        examples: dicts with `instruction` and `input`.
        adapters: adapters generated before, by instruction text (reused; new ones are added).
        **generation: `generate_outputs` options (`batch_size`, `max_new_tokens`, `num_beams`, `progress`).

    Returns:
        The outputs in the order of `examples`.
    """
    adapters = {} if adapters is None else adapters
    # Batches of inputs of different instructions, each row under its own adapter. Every adapter is generated alone,
    # so the outputs are those of one instruction at a time, in fewer `generate` calls (one per instruction before:
    # most of an evaluation where every example has its own wording). Beam search repeats each row consecutively,
    # which the TAGI layers and fusion expand the row index for.
    generate_adapters(model, tokenizer, [e["instruction"] for e in examples], adapters=adapters)
    batch_size = generation.pop("batch_size", 16)
    predictions = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        instructions = list(dict.fromkeys(e["instruction"] for e in batch))
        position = {text: i for i, text in enumerate(instructions)}
        weights = model.task_weights_from_adapters(
            [adapters[text] for text in instructions], torch.tensor([position[e["instruction"]] for e in batch])
        )
        predictions += generate_outputs(
            model,
            tokenizer,
            [e["input"] for e in batch],
            context=lambda: model.apply_task_weights(weights),  # noqa: B023 (called inside this iteration)
            batch_size=len(batch),
            **generation,
        )
    return predictions


# ---------------------------------------------------------------------------------------------------- scoring
def score(predictions: Sequence[str], examples: Sequence[dict]) -> dict:
    """SNI's ROUGE-L and exact match (0-100) of `predictions` against each example's `references` (or `output`),
    overall and per `task_name`: `{"rougeL", "exact_match", "per_task": {task: {"rougeL", "exact_match"}}}`."""
    from .metrics import compute_sni_metrics

    references = [e.get("references") or [e["output"]] for e in examples]
    tasks = [e["task_name"] for e in examples] if all("task_name" in e for e in examples) else None
    scores = compute_sni_metrics(predictions, references, tasks)
    return {
        "rougeL": scores["rougeL"],
        "exact_match": scores["exact_match"],
        "per_task": {
            t: {"rougeL": s["rougeL"], "exact_match": s["exact_match"]} for t, s in scores["per_task"].items()
        },
    }


def write_report(folder: str | os.PathLike, results: dict, rows: Sequence[tuple[str, str]], title: str) -> None:
    """Write `results` to `folder/results.json` and a bar chart of `results["rows"]` to `folder/results.png`.

    Args:
        folder: an existing folder.
        results: the report; `results["rows"][name]` holds `rougeL` and `exact_match` for every row in `rows`.
        rows: (name, label) of the rows to draw, in order.
        title: the chart's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [results["rows"][n]["rougeL"] for n, _ in rows], width=0.4, label="ROUGE-L")
    ax.bar([i + 0.2 for i in x], [results["rows"][n]["exact_match"] for n, _ in rows], width=0.4, label="exact match")
    ax.set_xticks(list(x))
    ax.set_xticklabels([textwrap.fill(label, 24) for _, label in rows], fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "results.png", dpi=120)
    plt.close(fig)


__all__ = [
    "generate_adapters",
    "generate_outputs",
    "group_by_instruction",
    "load_base_model",
    "load_tagi_model",
    "run_stages",
    "score",
    "serve_by_instruction",
    "tagi_model",
    "task_type_of",
    "train_stage",
    "training_arguments",
    "write_report",
]
