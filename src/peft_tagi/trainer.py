"""`TagiTrainer`: TAGI's three training stages (teachers, hypernetwork pretraining, distillation) on `transformers`."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK, TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .data.collator import STUDENT_KEYS, TagiDataCollator
from .data.example import EXAMPLE_KEYS
from .layer import TaskWeights
from .losses import bank_alignment_loss, kd_kl_loss, label_token_logits
from .model import TagiModel
from .serialization import overwrite_allowed
from .teachers import TeacherLoras, load_teachers, save_teachers

logger = logging.get_logger(__name__)
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")

STAGES = ("teachers", "pretrain", "distill")
TEACHER_LORAS = ("both", "meta", "bank")


@dataclass
class TagiTrainingArguments(Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus TAGI's stage and loss weights.

    Args:
        stage (`str`): `"teachers"` (meta-train LoRA + bank of per-task LoRAs), `"pretrain"` (hypernetwork on plain
            text split into instruction/input/target, cross-entropy only) or `"distill"` (hypernetwork with
            CE + KL to the logit teacher + ΔW alignment to the parameter teachers).
        kd_temperature (`float`): softmax temperature T of the KL term (scaled by T²).
        lambda_ce (`float`): weight of the cross-entropy term.
        lambda_kl (`float`): weight of KL(teacher_T ‖ student_T) over label tokens (the paper uses 5).
        lambda_ins (`str` or `float`): weight of the ΔW-alignment loss L_ins; `"sigmoid"` uses sigmoid(L_ins) as in
            the paper, a number uses that constant, 0 disables the term.
        ins_reduction (`str`): how L_ins reduces (ΔW_gen − ΔW_teacher)² over each module's out × in entries:
            `"mean"` (the paper's element-wise MSE, of order 1e-3 for trained adapters) or `"sum"` (the squared
            Frobenius norm, out · in times larger, which outweighs CE and KL by orders of magnitude). Averaged over
            modules and tasks either way.
        group_by (`str`): what the bank of parameter teachers is indexed by: `"task_name"` or `"category"`.
        teacher_loras (`str`): what stage `teachers` trains: `"both"` (the paper's), `"meta"` (the meta-train LoRA
            alone: the logit teacher of `lambda_kl`) or `"bank"` (the bank alone: the ΔW targets of `lambda_ins`, or
            per-task LoRAs for their own sake). A teacher no later stage reads costs a forward and backward pass per
            step; distillation refuses a folder that lacks a teacher its loss weights need.
        teachers_output_dir (`str`, *optional*): where stage `teachers` writes its LoRA folders; defaults to
            `<output_dir>/teachers`. An existing non-empty folder is only replaced with `overwrite_teachers=True`.
        overwrite_teachers (`bool`): allow replacing an existing teachers folder.
    """

    stage: str = field(default="distill", metadata={"help": "teachers | pretrain | distill"})
    kd_temperature: float = field(default=2.0, metadata={"help": "KL temperature."})
    lambda_ce: float = field(default=1.0, metadata={"help": "Cross-entropy weight."})
    lambda_kl: float = field(default=5.0, metadata={"help": "KL weight."})
    # Annotated `str` so that HfArgumentParser passes "sigmoid" or "0.5" through; __post_init__ turns a number into a
    # float (an `Any` or `str | float` field would make the command line reject one of the two forms).
    lambda_ins: str = field(default="sigmoid", metadata={"help": "'sigmoid' or a float: ΔW alignment weight."})
    ins_reduction: str = field(default="mean", metadata={"help": "L_ins per ΔW entry ('mean') or Frobenius ('sum')."})
    group_by: str = field(default="task_name", metadata={"help": "Bank index: task_name | category."})
    teacher_loras: str = field(default="both", metadata={"help": "Stage teachers trains: both | meta | bank."})
    teachers_output_dir: str | None = field(default=None, metadata={"help": "Teacher LoRA folders (stage teachers)."})
    overwrite_teachers: bool = field(default=False, metadata={"help": "Replace an existing teachers folder."})
    # The collator needs the raw text columns, which a model's forward signature does not name.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False for TAGI data."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"TagiTrainingArguments.stage must be one of {list(STAGES)}, got {self.stage!r}.")
        if self.ins_reduction not in ("mean", "sum"):
            raise ValueError(
                f"TagiTrainingArguments.ins_reduction must be 'mean' or 'sum', got {self.ins_reduction!r}."
            )
        if self.teacher_loras not in TEACHER_LORAS:
            raise ValueError(
                f"TagiTrainingArguments.teacher_loras must be one of {list(TEACHER_LORAS)}, got {self.teacher_loras!r}."
            )
        if self.group_by not in ("task_name", "category"):
            raise ValueError(
                f"TagiTrainingArguments.group_by must be 'task_name' or 'category', got {self.group_by!r}."
            )
        if isinstance(self.lambda_ins, str) and self.lambda_ins != "sigmoid":
            try:
                self.lambda_ins = float(self.lambda_ins)
            except ValueError:
                raise ValueError(
                    f"TagiTrainingArguments.lambda_ins must be 'sigmoid' or a number, got {self.lambda_ins!r}."
                ) from None
        for name in ("kd_temperature",):
            if getattr(self, name) <= 0:
                raise ValueError(f"TagiTrainingArguments.{name} must be positive, got {getattr(self, name)!r}.")
        for name in ("lambda_ce", "lambda_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"TagiTrainingArguments.{name} must be >= 0, got {getattr(self, name)!r}.")
        if not isinstance(self.lambda_ins, str) and self.lambda_ins < 0:
            raise ValueError(f"TagiTrainingArguments.lambda_ins must be 'sigmoid' or >= 0, got {self.lambda_ins!r}.")


def tagi_model_of(model: torch.nn.Module) -> TagiModel:
    """The `TagiModel` inside a PeftModel (possibly wrapped by DDP)."""
    model = getattr(model, "module", model)
    inner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(inner, TagiModel):
        raise TypeError(
            f"TagiTrainer needs a TAGI model (get_peft_model(base, TagiConfig(...))), got {type(model).__name__}."
        )
    return inner


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a readable `trainer_state.json`, which the Trainer writes last (checkpoint or run)."""
    try:
        json.loads((Path(folder) / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `output_dir` whose `trainer_state.json` (written last) reads back, or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    numbered = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    for _, checkpoint in sorted(numbered, reverse=True):
        if is_complete_checkpoint(checkpoint):
            return str(checkpoint)
        logger.warning(f"Skipping {checkpoint}: it is incomplete (the run stopped while writing it).")
    return None


class StageProgressCallback(ProgressCallback):
    """transformers' progress bar, labelled with the stage (or `run_name`), the latest loss terms shown on the bar.

    The stock callback writes every log dict as a line under the bar; a run of several stages then prints dozens of
    them. Here the bar carries the latest losses, and the dict goes to the logger at DEBUG.
    """

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc=self.label, dynamic_ncols=True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        losses = {k: v for k, v in logs.items() if k == "loss" or k.startswith("loss_")}
        if losses:
            self.training_bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
        logger.debug(f"{self.label} step {state.global_step}: {logs}")


class TagiTrainer(Seq2SeqTrainer):
    """Trains a TAGI model in one of three stages (`args.stage`).

    Args:
        model: a `PeftModel` made with `get_peft_model(base, TagiConfig(...))`.
        args (`TagiTrainingArguments`): the stage and loss weights among the usual training arguments.
        teachers (`str`, *optional*): stage `distill` only: the folder written by stage `teachers`. Its meta-train
            LoRA gives the teacher logits on the same frozen base (no second copy of the base model), its bank the
            ΔW targets.
        teacher_model (*optional*): stage `distill` only: a separate model with the same vocabulary that reads
            instruction + input and gives the teacher logits instead of the meta-train LoRA.
        Other arguments are `Seq2SeqTrainer`'s. `data_collator` defaults to a `TagiDataCollator` on
        `processing_class`.
    """

    # compute_loss returns a per-batch mean, so the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: torch.nn.Module,
        args: TagiTrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        teachers: str | os.PathLike | None = None,
        teacher_model: torch.nn.Module | None = None,
        processing_class=None,
        compute_metrics=None,
        **kwargs,
    ) -> None:
        if not isinstance(args, TagiTrainingArguments):
            raise TypeError("TagiTrainer needs TagiTrainingArguments (they carry the stage and loss weights).")
        tagi = tagi_model_of(model)
        self.causal = not tagi.model.config.is_encoder_decoder
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_counts: dict[str, int] = defaultdict(int)
        self.teacher_model = teacher_model
        self._meta_adapter = None
        self._bank_adapters: dict[str, Any] = {}
        group_names: list[str] = []
        group_by = args.group_by

        if args.stage == "teachers":
            if train_dataset is None:
                raise ValueError("Stage 'teachers' needs a train_dataset (one LoRA is trained per task or category).")
            if args.teacher_loras != "meta":
                values = train_dataset[group_by]
                if any(not v for v in values):
                    raise ValueError(f"Some training examples have an empty {group_by!r}; every example needs one.")
                group_names = sorted(set(values))
        elif args.stage == "distill":
            needs_kl = args.lambda_kl > 0 and teacher_model is None
            needs_ins = args.lambda_ins == "sigmoid" or args.lambda_ins > 0
            if teachers is None and (needs_kl or needs_ins):
                raise ValueError(
                    "Stage 'distill' with lambda_kl > 0 or lambda_ins needs teachers= (the folder written by stage "
                    "'teachers') or, for the KL term, teacher_model=. Set lambda_kl=0 and lambda_ins=0 to train "
                    "with cross-entropy only."
                )
            if teachers is not None:
                self._meta_adapter, self._bank_adapters, group_by = load_teachers(teachers)
                group_names = list(self._bank_adapters)
                missing = [
                    f"{what} (trained unless teacher_loras={other!r})"
                    for what, other, needed, present in (
                        ("the meta-train LoRA, the logit teacher of lambda_kl", "bank", needs_kl, self._meta_adapter),
                        ("the bank, the ΔW targets of lambda_ins", "meta", needs_ins, group_names),
                    )
                    if needed and not present
                ]
                if missing:
                    raise ValueError(
                        f"The teachers folder {teachers} lacks {' and '.join(missing)}: train the teachers again with "
                        "teacher_loras='both', or set the loss weight that needs it to 0."
                    )

        if data_collator is None:
            if processing_class is None:
                raise ValueError("Pass data_collator= or processing_class= (a tokenizer) to build a TagiDataCollator.")
            data_collator = TagiDataCollator(processing_class, causal=self.causal)
        if tagi.instruction_tokenizer is not None:
            # The instructions must be tokenized by the instruction encoder's tokenizer: ids of another vocabulary
            # would be read as other words, without an error.
            if not isinstance(data_collator, TagiDataCollator):
                raise ValueError(
                    f"This TAGI model reads instructions with {tagi.instruction_encoder.name!r}: pass a "
                    "TagiDataCollator (TagiTrainer sets its instruction_tokenizer), or tokenize the instructions with "
                    "model.instruction_tokenizer yourself and pass a TagiDataCollator(instruction_tokenizer=...)."
                )
            if data_collator.instruction_tokenizer is None:
                data_collator.instruction_tokenizer = tagi.instruction_tokenizer
        if isinstance(data_collator, TagiDataCollator) and group_names and data_collator.group_index is None:
            data_collator.group_index = {name: i for i, name in enumerate(group_names)}
            data_collator.group_by = group_by
        self.group_names = group_names

        self._set_trainable(tagi, args.stage, group_names, args.seed, meta=args.teacher_loras != "bank")
        if compute_metrics is None and args.predict_with_generate and processing_class is not None:
            compute_metrics = self._generation_metrics
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            **kwargs,
        )
        wants_fsdp = (args.fsdp and not args.fsdp_config.get("xla")) or os.environ.get("ACCELERATE_USE_FSDP") == "true"
        if wants_fsdp and not self.is_fsdp_enabled:
            # accelerate applies the FSDP plugin only on GPU-like devices; elsewhere the Trainer would quietly run DDP.
            raise ValueError(
                f"FSDP was requested but accelerate did not enable it ({self.accelerator.distributed_type}): FSDP "
                "needs GPUs (or NPUs, XPUs, ...). Drop --fsdp / fsdp= / accelerate's --use_fsdp to train with DDP on "
                "this machine."
            )
        if self.pop_callback(DEFAULT_PROGRESS_CALLBACK) is not None:
            self.add_callback(StageProgressCallback(args.run_name or args.stage))
        self._prepare_teachers(tagi)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _set_trainable(tagi: TagiModel, stage: str, group_names: list[str], seed: int, meta: bool = True) -> None:
        adapter_name = tagi.active_adapters[0]
        if stage == "teachers":
            device = tagi.model.get_input_embeddings().weight.device
            # The trainer creates these LoRAs, so `args.seed` decides their initialisation (as the Trainer seeds a
            # `model_init` model), not whatever the caller drew from the global generator before building it.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                teachers = TeacherLoras(tagi.target_specs, group_names, tagi.tagi_config.r, meta=meta).to(device)
            tagi.tagi_teachers = torch.nn.ModuleDict({adapter_name: teachers})
            tagi.tagi_hypernetwork.requires_grad_(False)
        else:
            if "tagi_teachers" in dict(tagi.named_children()):
                del tagi.tagi_teachers
            tagi.tagi_hypernetwork.requires_grad_(True)

    def _prepare_teachers(self, tagi: TagiModel) -> None:
        device = self.args.device
        self._meta_weights: TaskWeights | None = None
        self._bank_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self._meta_adapter is not None and self.teacher_model is None:
            # The meta-train teacher reads instruction + input itself: no fusion states.
            self._meta_weights = tagi.task_weights_from_adapter(self._meta_adapter.to(device), fusion=False)
        if self._bank_adapters:
            for name in tagi.tagi_layers:
                lora_A = torch.stack([a.lora_A[name] for a in self._bank_adapters.values()]).to(device)
                lora_B = torch.stack([a.lora_B[name] for a in self._bank_adapters.values()]).to(device)
                self._bank_weights[name] = (lora_A, lora_B)
            self._bank_scaling = next(iter(self._bank_adapters.values())).scaling
        if self.teacher_model is not None:
            self.teacher_model.to(device).eval().requires_grad_(False)

    def _set_signature_columns_if_needed(self) -> None:
        # With remove_unused_columns=True the Trainer keeps only forward() arguments; the collator needs the text.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *EXAMPLE_KEYS]))

    # ------------------------------------------------------------------ losses
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.stage == "teachers" and model.training:
            loss, outputs = self._teachers_loss(model, inputs)
            return (loss, outputs) if return_outputs else loss
        student = {k: inputs[k] for k in STUDENT_KEYS if k in inputs}
        outputs = model(**student)
        ce = outputs.loss
        loss = self.args.lambda_ce * ce
        terms = {"ce": ce}
        if self.args.stage == "distill" and model.training:
            if self.args.lambda_kl > 0:
                kl = self._kl_term(model, inputs, outputs.logits)
                loss = loss + self.args.lambda_kl * kl
                terms["kl"] = kl
            if self._bank_weights and (self.args.lambda_ins == "sigmoid" or self.args.lambda_ins > 0):
                ins = self._alignment_term(tagi_model_of(model), inputs["task_index"])
                weight = torch.sigmoid(ins.detach()) if self.args.lambda_ins == "sigmoid" else self.args.lambda_ins
                loss = loss + weight * ins
                terms["ins"] = ins
        if model.training:
            self._record(terms)
        return (loss, outputs) if return_outputs else loss

    def _teacher_batch(self, inputs) -> dict[str, torch.Tensor]:
        labels = inputs["teacher_labels"] if self.causal else inputs["labels"]
        return {
            "input_ids": inputs["teacher_input_ids"],
            "attention_mask": inputs["teacher_attention_mask"],
            "labels": labels,
        }

    def _kl_term(self, model, inputs, student_logits: torch.Tensor) -> torch.Tensor:
        teacher_batch = self._teacher_batch(inputs)
        was_training = model.training
        model.eval()  # no dropout in the teacher
        try:
            with torch.no_grad():
                if self.teacher_model is not None:
                    teacher_logits = self.teacher_model(**teacher_batch).logits
                else:
                    with tagi_model_of(model).apply_task_weights(self._meta_weights):
                        teacher_logits = model(**teacher_batch).logits
        finally:
            model.train(was_training)
        student = label_token_logits(student_logits, inputs["labels"], self.causal)
        teacher = label_token_logits(teacher_logits, teacher_batch["labels"], self.causal)
        return kd_kl_loss(student, teacher, self.args.kd_temperature)

    def _alignment_term(self, tagi: TagiModel, task_index: torch.Tensor) -> torch.Tensor:
        generated = tagi.last_task_weights
        return bank_alignment_loss(
            generated.weights,
            generated.row_index,
            task_index,
            self._bank_weights,
            tagi.tagi_config.scaling,
            self._bank_scaling,
            reduction=self.args.ins_reduction,
        )

    def _clip_grad_norm(self, model):
        if self.args.stage != "teachers":
            return super()._clip_grad_norm(model)
        tagi = tagi_model_of(model)
        return tagi.tagi_teachers[tagi.active_adapters[0]].clip_grad_norm_per_lora_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if not math.isfinite(float(grad_norm)):
            # A finite loss can still give NaN/inf gradients; the optimizer step would write them into every weight
            # (clipping by a non-finite norm makes all gradients NaN).
            broken = [
                n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            raise FloatingPointError(
                f"Training step {self.state.global_step + 1} (stage {self.args.stage!r}): the gradient norm is "
                f"{float(grad_norm)} although every loss term was finite; non-finite gradients in {len(broken)} "
                f"parameters, first {broken[:3]}. Lower the learning rate or resume from an earlier checkpoint."
            )
        return grad_norm

    def _teachers_loss(self, model, inputs):
        """Meta-train LoRA (instruction + input) and bank LoRAs (input only): one forward pass each, one backward.

        Two passes rather than one of 2N rows: the bank's rows lack the instruction, and padding them to the meta
        rows' width would spend most of their compute (and their backward) on padding. The meta-train LoRA is one
        weight set, applied to its whole pass as a plain low-rank matmul. A teacher left out (`teacher_loras`) skips
        its pass.
        """
        tagi = tagi_model_of(model)
        teachers = tagi.tagi_teachers[tagi.active_adapters[0]]
        passes = []
        if teachers.meta is not None:
            meta = teachers.meta.task_weights(torch.zeros(1, dtype=torch.long, device=inputs["input_ids"].device))
            passes.append(("ce_meta", self._teacher_batch(inputs), TaskWeights(meta.weights, None, None, None)))
        if teachers.bank is not None:
            task_index = inputs["task_index"]
            if (task_index < 0).any():
                raise ValueError(
                    "A training example's task is not in the teacher bank; rebuild the trainer on this data."
                )
            bank_batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
            passes.append(("ce_bank", bank_batch, teachers.bank.task_weights(task_index)))
        terms, outputs = {}, []
        for name, batch, weights in passes:
            with tagi.apply_task_weights(weights):
                outputs.append(model(**batch))
            labels = batch["labels"]
            token_labels = labels[:, 1:] if self.causal else labels
            terms[name] = F.cross_entropy(
                label_token_logits(outputs[-1].logits, labels, self.causal).float(), token_labels[token_labels != -100]
            )
        self._record(terms)
        return sum(terms.values()), outputs[0]  # the first pass's outputs (the meta-train LoRA's), for return_outputs

    def _record(self, terms: dict[str, torch.Tensor]) -> None:
        values = {name: float(value.detach()) for name, value in terms.items()}
        broken = [name for name, value in values.items() if not math.isfinite(value)]
        if broken:
            # Stop at the first non-finite term: an optimizer step on it would write NaN into every weight.
            raise FloatingPointError(
                f"Training step {self.state.global_step + 1} (stage {self.args.stage!r}): the loss term(s) "
                f"{', '.join(f'{n}={values[n]}' for n in broken)} are not finite. Lower the learning rate, "
                "check the data of this step, or resume from an earlier checkpoint."
            )
        for name, value in values.items():
            self._term_sums[name] += value
            self._term_counts[name] += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._term_counts:
            for name, total in self._term_sums.items():
                logs[f"loss_{name}"] = round(total / self._term_counts[name], 6)
            self._term_sums.clear()
            self._term_counts.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ outputs
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint.

        A process killed while writing `checkpoint-N` leaves a folder without `trainer_state.json` (the Trainer writes
        it last). transformers would pick that folder; here it is skipped with a warning, and passing it by path is
        refused.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint-N folder; "
                    "train from scratch (resume_from_checkpoint=None) or pass a checkpoint path."
                )
        elif resume_from_checkpoint and not is_complete_checkpoint(Path(resume_from_checkpoint)):
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete checkpoint (no readable {TRAINER_STATE_NAME}: the run "
                "stopped while writing it); resume from an earlier checkpoint-N or with resume_from_checkpoint=True."
            )
        self._read_instructions_ahead()
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.args.stage == "teachers" and self.is_world_process_zero():
            self.save_teachers()
        return result

    def _read_instructions_ahead(self) -> None:
        """With a separate instruction encoder, encode the dataset's instructions before a stage that reads them all.

        Its states are kept anyway (`InstructionEncoder`); reading them ahead, shortest first, spends less on padding
        than encoding them inside the training batches. Only when the stage reads at least one epoch: otherwise most
        of what it would encode ahead is never read.
        """
        tagi = tagi_model_of(self.model)
        dataset = self.train_dataset
        if self.args.stage == "teachers" or tagi.instruction_encoder is None or not isinstance(dataset, Dataset):
            return
        if "instruction" not in dataset.column_names or not isinstance(self.data_collator, TagiDataCollator):
            return
        rows = self.args.max_steps * self.args.train_batch_size * self.args.gradient_accumulation_steps
        if 0 < rows * self.args.world_size < len(dataset):
            return
        tagi.instruction_encoder.read_ahead(
            dataset["instruction"], max_length=self.data_collator.max_instruction_length
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The Trainer writes into its output and checkpoint folders on every save; the TAGI save guard still makes
        # each write atomic and keeps whatever else is in the folder (checkpoints, teachers).
        with overwrite_allowed():
            super()._save(output_dir, state_dict)

    def save_teachers(self, path: str | os.PathLike | None = None) -> Path:
        """Write the meta-train LoRA and every bank LoRA (those `teacher_loras` trains) as standard PEFT LoRA folders
        (stage 'teachers')."""
        tagi = tagi_model_of(self.model)
        if "tagi_teachers" not in dict(tagi.named_children()):
            raise ValueError("No teachers to save: this trainer is not in stage 'teachers'.")
        path = Path(path or self.args.teachers_output_dir or Path(self.args.output_dir) / "teachers")
        saved = save_teachers(
            tagi.tagi_teachers[tagi.active_adapters[0]],
            path,
            tagi.new_task_adapter,
            group_by=self.args.group_by,
            overwrite=self.args.overwrite_teachers,
        )
        meta = "the meta-train LoRA and " if self.args.teacher_loras != "bank" else ""
        logger.info(f"Wrote {meta}{len(self.group_names)} bank LoRAs to {saved}")
        return saved

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """Loss on the student's inputs and, with `predict_with_generate`, generation from them."""
        inputs = self._prepare_inputs(inputs)
        student = {k: inputs[k] for k in STUDENT_KEYS if k in inputs}
        labels = student.get("labels")
        with torch.no_grad():
            loss = model(**student).loss.detach() if labels is not None else None
        if prediction_loss_only or not self.args.predict_with_generate:
            return loss, None, labels
        if self.causal:
            raise ValueError(
                "predict_with_generate is supported for seq2seq TAGI models; evaluate decoder-only by loss."
            )
        kwargs = dict(getattr(self, "_gen_kwargs", {}) or {})
        kwargs.update(gen_kwargs)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if "max_length" not in kwargs and "max_new_tokens" not in kwargs:
            kwargs["max_new_tokens"] = self.args.generation_max_length or 32
        generation_inputs = {k: v for k, v in student.items() if k != "labels"}
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad():
            tokens = unwrapped.generate(**generation_inputs, **kwargs)
        return loss, tokens, labels

    def _generation_metrics(self, eval_prediction) -> dict[str, float]:
        """SNI ROUGE-L and exact match (Tk-Instruct normalisation), mean and per task."""
        from .metric_modules import sni_metric

        tokenizer = self.processing_class
        predictions = np.where(eval_prediction.predictions < 0, tokenizer.pad_token_id, eval_prediction.predictions)
        labels = np.where(eval_prediction.label_ids < 0, tokenizer.pad_token_id, eval_prediction.label_ids)
        texts = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        references = [[t.strip()] for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        task_names = None
        dataset = self.eval_dataset
        if dataset is not None and not isinstance(dataset, dict) and len(dataset) == len(texts):
            if "references" in dataset.column_names:
                references = [list(r) for r in dataset["references"]]
            task_names = list(dataset["task_name"])
        scores = sni_metric().compute(predictions=texts, references=references, task_names=task_names)
        metrics = {"rougeL": scores["rougeL"], "exact_match": scores["exact_match"]}
        for task, task_scores in scores.get("per_task", {}).items():
            metrics[f"rougeL_{task}"] = task_scores["rougeL"]
            metrics[f"exact_match_{task}"] = task_scores["exact_match"]
        return metrics
