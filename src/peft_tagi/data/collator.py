"""`TagiDataCollator`: batches examples of the one format into student, teacher and task-index tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

REQUIRED_KEYS = ("task_name", "instruction", "input", "output")
STUDENT_KEYS = ("input_ids", "attention_mask", "labels", "instruction_input_ids", "instruction_attention_mask")


@dataclass
class TagiDataCollator:
    """Tokenizes and pads a list of examples (`task_name`, `instruction`, `input`, `output`, ...).

    Returns, for a batch of N examples:
        instruction_input_ids, instruction_attention_mask: (N, S) the instruction, for the hypernetwork.
        input_ids, attention_mask: (N, L) the student's input, without the instruction.
        labels: (N, T) target ids, padding = -100.
        teacher_input_ids, teacher_attention_mask: (N, L') instruction + separator + input, for the meta-train
            teacher (the instruction is read with every input, as in Tk-Instruct); an example's
            `teacher_instruction`, when it has one, in place of its `instruction`.
        task_index: (N,) index of the example's task (or category) in `group_index`, -1 when unknown or unset.
    For `causal=True` (decoder-only models) the target follows the input in `input_ids`, `labels` masks the prompt,
    and `teacher_labels` does the same for the teacher's sequence.

    Args:
        tokenizer: a `transformers` tokenizer with a pad token.
        max_instruction_length, max_input_length, max_target_length: truncation limits in tokens.
        group_index: {task name or category: index} for `task_index` (TagiTrainer fills it in).
        group_by: which example field `group_index` keys on: `"task_name"` or `"category"`.
        teacher_separator: text between instruction and input in the teacher's input.
        causal: True for decoder-only models.
        instruction_tokenizer: the tokenizer of the instructions when the TAGI model reads them with its own
            instruction encoder (`TagiModel.instruction_tokenizer`; TagiTrainer fills it in); None: `tokenizer`. The
            teacher's instruction + input is always read with `tokenizer`.
    """

    tokenizer: Any
    max_instruction_length: int = 512
    max_input_length: int = 512
    max_target_length: int = 128
    group_index: dict[str, int] | None = None
    group_by: str = "task_name"
    teacher_separator: str = "\n"
    causal: bool = False
    instruction_tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.group_by not in ("task_name", "category"):
            raise ValueError(f"TagiDataCollator.group_by must be 'task_name' or 'category', got {self.group_by!r}.")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token before collating.")

    def _encode(
        self, texts: list[str], max_length: int, special: bool = True, tokenizer: Any = None
    ) -> dict[str, torch.Tensor]:
        return (tokenizer or self.tokenizer)(
            texts,
            max_length=max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
            add_special_tokens=special,
        )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        for i, feature in enumerate(features):
            missing = [k for k in REQUIRED_KEYS if k not in feature]
            if missing:
                raise ValueError(
                    f"Example {i} lacks {missing}; every example needs {list(REQUIRED_KEYS)}. If you use "
                    "transformers.Trainer, set remove_unused_columns=False (TagiTrainingArguments does)."
                )
        instructions = [f["instruction"] for f in features]
        inputs = [f["input"] for f in features]
        outputs = [f["output"] for f in features]
        # An example may give the teacher another wording of its instruction than the hypernetwork reads
        # (`teacher_instruction`, e.g. `SyntheticSuite.free_wording_examples`): words the base's tokenizer knows.
        teacher_instructions = [f.get("teacher_instruction") or f["instruction"] for f in features]
        teacher_inputs = [f"{ins}{self.teacher_separator}{inp}" for ins, inp in zip(teacher_instructions, inputs)]
        batch = {}
        ins = self._encode(instructions, self.max_instruction_length, tokenizer=self.instruction_tokenizer)
        batch["instruction_input_ids"], batch["instruction_attention_mask"] = ins["input_ids"], ins["attention_mask"]
        if self.causal:
            batch.update(self._causal(inputs, outputs, prefix=""))
            teacher = self._causal(teacher_inputs, outputs, prefix="teacher_")
            batch.update(teacher)
        else:
            student = self._encode(inputs, self.max_input_length)
            batch["input_ids"], batch["attention_mask"] = student["input_ids"], student["attention_mask"]
            labels = self._encode(outputs, self.max_target_length)
            batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
            teacher = self._encode(teacher_inputs, self.max_instruction_length + self.max_input_length)
            batch["teacher_input_ids"], batch["teacher_attention_mask"] = (
                teacher["input_ids"],
                teacher["attention_mask"],
            )
        groups = [f.get(self.group_by, "") for f in features]
        index = self.group_index or {}
        batch["task_index"] = torch.tensor([index.get(g, -1) for g in groups], dtype=torch.long)
        return batch

    def _causal(self, prompts: list[str], targets: list[str], prefix: str) -> dict[str, torch.Tensor]:
        """prompt + target (+ eos) in one right-padded sequence; labels cover the target only."""
        eos = self.tokenizer.eos_token_id
        rows, label_rows = [], []
        for prompt, target in zip(prompts, targets):
            p = self.tokenizer(prompt, add_special_tokens=False, truncation=True, max_length=self.max_input_length)
            t = self.tokenizer(target, add_special_tokens=False, truncation=True, max_length=self.max_target_length)
            target_ids = t["input_ids"] + ([eos] if eos is not None else [])
            rows.append(p["input_ids"] + target_ids)
            label_rows.append([-100] * len(p["input_ids"]) + target_ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (row, label_row) in enumerate(zip(rows, label_rows)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, : len(row)] = torch.tensor(label_row)
        return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}
