"""`TagiLinear`: a linear layer plus a low-rank update whose weights differ per example of the batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from transformers.pytorch_utils import Conv1D

if TYPE_CHECKING:
    from .config import TagiConfig


@dataclass
class TaskWeights:
    """LoRA weights for the rows of a batch, as the TAGI layers (and, with instruction fusion, the decoder) apply them.

    Produced by the hypernetwork (`TagiModel.task_weights_from_instructions`), a `TaskAdapter` or a bank of teacher
    LoRAs; applied with `TagiModel.apply_task_weights`. `states` (instruction fusion) is None when the decoder should
    not see an instruction.

    `instruction_kv` is instruction fusion's cache (`fusion.InstructionFusion`): for every cross-attention module of the
    decoder, each task's instruction projected to its keys and values, computed at the first decoder call under these
    weights and reused by every row, batch and decoding step while they are applied.
    """

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A (T, r, in), B (T, out, r))
    row_index: torch.Tensor | None  # (batch,) or None for one task
    states: torch.Tensor | None  # (T, S, d) fusion states or None
    states_mask: torch.Tensor | None  # (T, S)
    instruction_kv: dict[nn.Module, Any] = field(default_factory=dict, repr=False)


class TagiLinear(nn.Module, BaseTunerLayer):
    """Wraps an `nn.Linear` (or GPT-2's `Conv1D`) and adds `scaling * dropout(x) @ A[t].T @ B[t].T`.

    The layer owns no LoRA weights. Whoever drives it (the hypernetwork, a bank of task LoRAs or a cached
    `TaskAdapter`) calls `set_task_weights` with one (A, B) pair per task and, for a batch that mixes tasks, the task
    of every row. Without task weights, or with adapters disabled, the layer is exactly its base layer.

    Shapes:
        A: (T, r, in_features), B: (T, out_features, r), row_index: (batch,) with values in [0, T) or None (T == 1,
        every row uses the same pair). Inputs x: (N, ..., in_features) where N is the batch size or a multiple of it
        (beam search and `num_return_sequences` repeat each row consecutively).
    """

    # Nothing per adapter name: the weights come from outside and a TAGI model holds one adapter. peft's generic code
    # (delete_adapter, device moves) treats every name listed here as a dict keyed by adapter name.
    adapter_layer_names = ()
    other_param_names = ()

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise ValueError(
                f"TAGI can only target nn.Linear or transformers Conv1D layers, got {type(base_layer).__name__}. "
                "Choose other target_modules in TagiConfig."
            )
        self.in_features, self.out_features = _get_in_out_features(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self._task_A: torch.Tensor | None = None
        self._task_B: torch.Tensor | None = None
        self._row_index: torch.Tensor | None = None
        self._weight_before_merge: torch.Tensor | None = None

    def set_task_weights(
        self, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, row_index: torch.Tensor | None = None
    ) -> None:
        """Install task weights (A: (T, r, in), B: (T, out, r)); `None` removes them."""
        if lora_A is not None:
            if lora_A.shape[1:] != (self.r, self.in_features) or lora_B.shape[1:] != (self.out_features, self.r):
                raise ValueError(
                    f"Task weights of shape A{tuple(lora_A.shape[1:])}, B{tuple(lora_B.shape[1:])} do not fit this "
                    f"layer (expects A({self.r}, {self.in_features}), B({self.out_features}, {self.r})): the adapter "
                    "was made for another model or rank."
                )
            if row_index is None and lora_A.shape[0] != 1:
                raise ValueError("Several task weight sets need a row_index that maps each batch row to one of them.")
        self._task_A, self._task_B, self._row_index = lora_A, lora_B, row_index

    @property
    def task_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The installed (A, B, row_index), or Nones."""
        return self._task_A, self._task_B, self._row_index

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B · A of the single installed task, shaped like the base weight."""
        if self._task_A is None or self._task_A.shape[0] != 1:
            raise ValueError(
                "Merging needs exactly one task adapter: wrap the call in `with model.use_adapter(task_adapter):`."
            )
        delta = (self._task_B[0] @ self._task_A[0]) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    # peft's conversion API (`peft.tuners.lora.conversion.convert_to_lora` / `save_as_lora`) asks every tuner layer
    # these two. A TAGI layer holds whatever task weights are installed, so it converts exactly one task's: the one
    # of a `use_adapter` block. ΔW = s·B·A has rank r, so converting at rank >= r reproduces it exactly. As for a
    # `save_lora` folder loaded by plain peft, the converted LoRA carries no instruction fusion.
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        if self._task_A is None or self._task_A.shape[0] != 1 or self._row_index is not None:
            raise ValueError(
                "A TAGI model converts to LoRA one task at a time: call convert_to_lora / save_as_lora inside "
                "`with model.use_adapter(task_adapter):` (TaskAdapter.save_lora writes the same LoRA directly)."
            )
        if adapter_name not in self.active_adapters:
            raise ValueError(f"This TAGI model's adapter is {self.active_adapters[0]!r}, not {adapter_name!r}.")
        return True

    def get_delta_weight(self, adapter_name: str = "default") -> torch.Tensor:
        """ΔW of the task installed by `use_adapter`, shaped like the base weight (peft's conversion API)."""
        return self.delta_weight()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self.merged:
            return
        delta = self.delta_weight()
        weight = self._get_dense_weight()
        merged = weight + delta.to(weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("NaN or inf found while merging the task adapter; the generated weights are broken.")
        self._set_dense_weight(merged)
        # Unmerging puts this tensor back instead of subtracting ΔW: W + ΔW - ΔW is not bitwise W in floating point.
        # For a float base weight it is the original tensor itself (no copy); for a quantized one, its dequantization.
        self._weight_before_merge = weight
        self.merged_adapters = [self.active_adapter]

    def unmerge(self) -> None:
        if not self.merged:
            return
        self._set_dense_weight(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged_adapters = []

    # Merging reads and writes the base weight only through these two methods, so that a layer whose weight is
    # stored quantized (bnb.py) overrides them and nothing else.
    def _get_dense_weight(self) -> torch.Tensor:
        """The base weight as a floating-point tensor shaped like `delta_weight()`."""
        weight = self.get_base_layer().weight.data
        if not weight.is_floating_point():
            # Adding ΔW to integer storage would round it away or break the packing: refuse instead.
            raise TypeError(
                f"{type(self.get_base_layer()).__name__} stores its weight quantized ({weight.dtype}); a plain "
                "TagiLinear cannot merge into it. Let get_peft_model create the layer: with bitsandbytes installed "
                "it builds TagiLinear8bitLt / TagiLinear4bit, which dequantize, merge and re-quantize."
            )
        return weight

    def _set_dense_weight(self, weight: torch.Tensor) -> None:
        """Store `weight` (shaped like `delta_weight()`) as the base weight."""
        self.get_base_layer().weight.data = weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._forward(x, self._row_index, *args, **kwargs)

    def forward_per_task(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on one input per installed task: x (T, ..., in_features), row t through task t's weights.

        Used to project each task's instruction states once (see `TagiModel`'s shared instruction keys and values),
        whatever the batch rows that will read them.
        """
        if self._row_index is None:
            return self._forward(x, None)
        if self._task_A is not None and x.shape[0] != self._task_A.shape[0]:
            raise ValueError(f"forward_per_task got {x.shape[0]} rows for {self._task_A.shape[0]} installed tasks.")
        return self._forward(x, torch.arange(x.shape[0], device=self._row_index.device))

    def _forward(self, x: torch.Tensor, row_index: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged or self._task_A is None:
            return result
        lora_A, lora_B = self._task_A.to(x.dtype), self._task_B.to(x.dtype)
        x = self.lora_dropout(x)
        if row_index is None:
            # One task for the whole batch: a plain low-rank matmul.
            delta = (x @ lora_A[0].T) @ lora_B[0].T
        else:
            n_rows = x.shape[0]
            index = row_index
            if n_rows != index.shape[0]:
                if n_rows % index.shape[0]:
                    raise ValueError(
                        f"The batch has {n_rows} rows but the instructions {index.shape[0]}: pass one instruction "
                        "per input row."
                    )
                index = index.repeat_interleave(n_rows // index.shape[0])
            flat = x.reshape(n_rows, -1, x.shape[-1])
            # index_select, not lora_A[index]: rows that share a task sum their gradients into one entry, and the
            # backward of advanced indexing sums them in an order that varies between runs on several CPU threads.
            A, B = lora_A.index_select(0, index), lora_B.index_select(0, index)
            delta = torch.bmm(torch.bmm(flat, A.transpose(1, 2)), B.transpose(1, 2))
            delta = delta.reshape(*x.shape[:-1], self.out_features)
        return result + delta * self.scaling

    def __repr__(self) -> str:
        return "tagi." + super().__repr__()


def dispatch_default(target: nn.Module, adapter_name: str, config: TagiConfig, **kwargs) -> TagiLinear | None:
    """A `TagiLinear` for a plain `nn.Linear` or `Conv1D` target, None for anything else (the last dispatcher)."""
    base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base_layer, (nn.Linear, Conv1D)):
        return None
    return TagiLinear(target, adapter_name, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
