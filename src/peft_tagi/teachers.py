"""Teacher LoRAs of stage 1: the meta-train LoRA (logit teacher) and a bank of per-task LoRAs (parameter teachers).

Both are rows of one `LoraBank`: learned (A, B) pairs for every TAGI target module, applied through the same
per-example `TagiLinear` layers as generated adapters, so the whole bank trains in one run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .adapter import TaskAdapter
from .hypernetwork import TargetSpec
from .layer import TaskWeights
from .serialization import atomic_write_dir

TEACHERS_INDEX = "teachers.json"


def _param_key(name: str) -> str:
    return name.replace(".", "__")


class LoraBank(nn.Module):
    """`num_entries` LoRA pairs per target module. Entry e of module m: A (r, in), B (out, r).

    Initialised like PEFT LoRA (A kaiming-uniform, B zero), so every entry starts as the base model.
    """

    def __init__(self, targets: list[TargetSpec], num_entries: int, r: int) -> None:
        super().__init__()
        self.names = [t.name for t in targets]
        self.num_entries = num_entries
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for spec in targets:
            bound = 1.0 / math.sqrt(spec.in_features)
            self.lora_A[_param_key(spec.name)] = nn.Parameter(
                torch.empty(num_entries, r, spec.in_features).uniform_(-bound, bound)
            )
            self.lora_B[_param_key(spec.name)] = nn.Parameter(torch.zeros(num_entries, spec.out_features, r))

    def task_weights(self, entry_index: torch.Tensor) -> TaskWeights:
        """Weights for a batch whose row i uses entry `entry_index[i]` (shape (batch,)); each entry gathered once."""
        unique, row_index = torch.unique(entry_index, return_inverse=True)
        weights = {
            name: (self.lora_A[_param_key(name)][unique], self.lora_B[_param_key(name)][unique]) for name in self.names
        }
        return TaskWeights(weights=weights, row_index=row_index, states=None, states_mask=None)

    def entry_weights(self, entry: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        lora_A = {name: self.lora_A[_param_key(name)][entry].detach().clone() for name in self.names}
        lora_B = {name: self.lora_B[_param_key(name)][entry].detach().clone() for name in self.names}
        return lora_A, lora_B


class TeacherLoras(nn.Module):
    """The stage-1 teachers: `meta` (one LoRA reading instruction + input) and `bank` (one LoRA per group).

    Either may be left out (`meta=False`, no `group_names`) when no later stage reads it: the meta-train LoRA is the
    logit teacher of distillation's KL term, the bank holds the ΔW targets of its alignment term.
    """

    def __init__(self, targets: list[TargetSpec], group_names: list[str], r: int, meta: bool = True) -> None:
        super().__init__()
        if not meta and not group_names:
            raise ValueError("TeacherLoras needs the meta-train LoRA, bank groups, or both; it was given neither.")
        self.group_names = list(group_names)
        # Drawn even when left out, so that the bank starts from the same weights either way.
        meta_lora = LoraBank(targets, 1, r)
        self.meta = meta_lora if meta else None
        self.bank = LoraBank(targets, len(group_names), r) if group_names else None

    def clip_grad_norm_per_lora_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradient of every LoRA (the meta one and each bank entry) to `max_norm` on its own.

        The teachers share forward passes and optimizer steps only to save time; clipping them together would let
        one task's gradients shrink another's updates. Returns the norm of all gradients before clipping.
        """
        squares = []
        for bank in (b for b in (self.meta, self.bank) if b is not None):
            grads = [p.grad for p in bank.parameters() if p.grad is not None]
            if not grads:
                continue
            per_lora = sum(g.pow(2).flatten(1).sum(1) for g in grads)  # (entries,)
            scale = (max_norm / (per_lora.sqrt() + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
            squares.append(per_lora.sum())
        return torch.stack(squares).sum().sqrt()


def safe_folder_name(name: str) -> str:
    """A file-system-safe folder name for a task or category (kept readable, made unique by the caller)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "group"


def save_teachers(
    teachers: TeacherLoras,
    path: str | os.PathLike,
    new_adapter: Callable[..., TaskAdapter],
    group_by: str,
    overwrite: bool = False,
) -> Path:
    """Write every teacher as a standard PEFT LoRA folder, plus `teachers.json` that indexes them.

    `new_adapter(lora_A=..., lora_B=...)` makes a `TaskAdapter` of the model's targets (`TagiModel.new_task_adapter`).
    Layout: `meta/` (the logit teacher), `bank/<group>/` (one per task or category), `teachers.json`; a teacher the
    stage did not train is absent (`"meta": null` or an empty `"bank"` in the index).
    """
    path = Path(path)

    def write(tmp: Path) -> None:
        adapter = None
        if teachers.meta is not None:
            meta_A, meta_B = teachers.meta.entry_weights(0)
            adapter = new_adapter(lora_A=meta_A, lora_B=meta_B)
            adapter.save_lora(tmp / "meta")
        folders, used = {}, set()
        for entry, group in enumerate(teachers.group_names):
            folder = safe_folder_name(group)
            while folder in used:
                folder += "_"
            used.add(folder)
            folders[group] = f"bank/{folder}"
            lora_A, lora_B = teachers.bank.entry_weights(entry)
            adapter = new_adapter(lora_A=lora_A, lora_B=lora_B)
            adapter.save_lora(tmp / "bank" / folder)
        index = {
            "group_by": group_by,
            "meta": "meta" if teachers.meta is not None else None,
            "bank": folders,
            "r": adapter.r,
            "lora_alpha": adapter.lora_alpha,
        }
        (tmp / TEACHERS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    atomic_write_dir(path, write, overwrite=overwrite)
    return path


def read_teachers_index(path: str | os.PathLike) -> dict:
    """The `teachers.json` of a folder written by `save_teachers` (which teachers it holds, where), no weights read."""
    index_file = Path(path) / TEACHERS_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a teachers folder (no {TEACHERS_INDEX}); run the 'teachers' stage first and pass its "
            "output folder as teachers=."
        )
    return json.loads(index_file.read_text())


def load_teachers(path: str | os.PathLike) -> tuple[TaskAdapter | None, dict[str, TaskAdapter], str]:
    """Read a folder written by `save_teachers`: (meta LoRA or None if not trained, {group: bank LoRA}, group_by)."""
    path = Path(path)
    index = read_teachers_index(path)
    meta = TaskAdapter.load(path / index["meta"]) if index["meta"] is not None else None
    bank = {group: TaskAdapter.load(path / folder) for group, folder in index["bank"].items()}
    return meta, bank, index["group_by"]
