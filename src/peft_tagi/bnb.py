"""TAGI layers over bitsandbytes 8-bit and 4-bit linear layers (QLoRA-style bases), and their dispatchers.

Training and inference need nothing special: the base layer computes in its quantized form and `TagiLinear.forward`
adds the per-example low-rank update in full precision. Only merging touches the stored weight, so these layers
override the two methods through which `TagiLinear.merge` / `unmerge` read and write it: read dequantizes, write
re-quantizes, following `peft.tuners.lora.bnb`. Re-quantizing rounds, so a merged (or merged then unmerged) layer
matches the unmerged one only up to the quantization error of its weight.

bitsandbytes is optional (`pip install "peft-tagi[quant]"`): this module defines its classes only when it is
importable, and `TagiModel` imports it lazily.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

from .layer import TagiLinear

if TYPE_CHECKING:
    from .config import TagiConfig


def _base_of(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


if is_bnb_available():
    import bitsandbytes as bnb

    class TagiLinear8bitLt(TagiLinear):
        """`TagiLinear` over a `bnb.nn.Linear8bitLt` (LLM.int8() weights: int8 with one scale per output row).

        Shapes as in `TagiLinear`; the base weight is int8 (out_features, in_features), or float with
        `llm_int8_has_fp16_weight=True` (then merging is exact: nothing is re-quantized).
        """

        def _get_dense_weight(self) -> torch.Tensor:
            base_layer = self.get_base_layer()
            state = base_layer.state
            if state.has_fp16_weights:
                # llm_int8_has_fp16_weight=True: the weight stays in float and is quantized at every forward.
                return super()._get_dense_weight()
            if state.SCB is None:
                # Before the first forward the row scales still live on the weight, not on the layer state.
                state.SCB = base_layer.weight.SCB
            return dequantize_bnb_weight(base_layer.weight, state=state)

        def _set_dense_weight(self, weight: torch.Tensor) -> None:
            base_layer = self.get_base_layer()
            if base_layer.state.has_fp16_weights:
                super()._set_dense_weight(weight)
                base_layer.state.reset_grads()  # drop any int8 copy of the old weight
                return
            warnings.warn(
                "Merging into (or unmerging from) an 8-bit layer re-quantizes its weight: outputs may differ from "
                "the unmerged model by rounding errors.",
                stacklevel=3,
            )
            old = base_layer.weight
            # Int8Params quantizes when moved from the CPU to a device, so build it on the CPU and move it back.
            base_layer.weight = bnb.nn.Int8Params(
                weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
            ).to(old.device)
            # The cached int8 matrix and scales belong to the old weight; the next forward reads the new ones.
            base_layer.state.reset_grads()

    def dispatch_bnb_8bit(
        target: nn.Module, adapter_name: str, config: TagiConfig, **kwargs
    ) -> TagiLinear8bitLt | None:
        """A `TagiLinear8bitLt` for a `bnb.nn.Linear8bitLt` target, None for anything else."""
        if not isinstance(_base_of(target), bnb.nn.Linear8bitLt):
            return None
        return TagiLinear8bitLt(
            target, adapter_name, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout
        )


if is_bnb_4bit_available():
    import bitsandbytes as bnb

    class TagiLinear4bit(TagiLinear):
        """`TagiLinear` over a `bnb.nn.Linear4bit` (NF4 / FP4 weights, two values packed per byte).

        Shapes as in `TagiLinear`: in_features and out_features come from the layer, not from its packed weight
        (which has shape (in_features * out_features / 2, 1)).
        """

        def _get_dense_weight(self) -> torch.Tensor:
            weight = self.get_base_layer().weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                # On CPUs with AVX512-BF16, Linear4bit repacks its weight for inference at the first forward;
                # dequantization reads the standard layout, so undo that first (as Linear4bit's own save does).
                weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                    weight.data, weight.quant_state
                )
            return dequantize_bnb_weight(weight, state=weight.quant_state)

        def _set_dense_weight(self, weight: torch.Tensor) -> None:
            warnings.warn(
                "Merging into (or unmerging from) a 4-bit layer re-quantizes its weight: outputs may differ from "
                "the unmerged model by rounding errors.",
                stacklevel=3,
            )
            base_layer = self.get_base_layer()
            old = base_layer.weight
            # Keep the quantization settings (quant_type, blocksize, compress_statistics, quant_storage, ...) of the
            # old weight; drop its data, its quant_state and the private attributes torch.compile may add.
            settings = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
            settings.update(bnb_quantized=False, requires_grad=False, quant_state=None)
            # Params4bit quantizes when moved to a device, so build it on the CPU and move it back.
            base_layer.weight = bnb.nn.Params4bit(weight.to("cpu"), **settings).to(old.device)

    def dispatch_bnb_4bit(target: nn.Module, adapter_name: str, config: TagiConfig, **kwargs) -> TagiLinear4bit | None:
        """A `TagiLinear4bit` for a `bnb.nn.Linear4bit` target, None for anything else."""
        if not isinstance(_base_of(target), bnb.nn.Linear4bit):
            return None
        return TagiLinear4bit(
            target, adapter_name, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout
        )
