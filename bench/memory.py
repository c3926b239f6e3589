"""A memory model of TAGI training: predicted peak bytes of each stage, validated against measured steps.

    python -m bench.memory --out memory.json              # table for t5-base ... t5-11b and a Llama-3-8B shape
    python -m bench.memory --validate --out memory.json   # also measure real CPU steps on small shapes (~1 min)

What is counted (bytes, one device, one optimizer step, data-parallel degree 1):

- base weights: every parameter of the transformers model. fp32: 4 B, bf16: 2 B. 8-bit (bitsandbytes LLM.int8):
  every `nn.Linear` inside the blocks 1 B per weight + one fp32 scale per output row; 4-bit (NF4, block 64, no double
  quantization): 0.5 B per weight + one fp32 absmax per 64 weights. Embeddings, norms and the LM head stay in bf16.
- trainable state (AdamW): parameter 4 B + gradient 4 B + two fp32 moments 8 B = 16 B per trainable parameter, plus
  one fp32 temporary per parameter while `foreach` AdamW runs (`_foreach_sqrt` of the second moment).
  `teachers` trains the bank: 1 meta LoRA + G group LoRAs, each r·(in + out) per target module; `pretrain` and
  `distill` train the hypernetwork. Frozen extras: the hypernetwork in `teachers` (fp32), the stacked bank
  (G LoRAs) and the meta LoRA in `distill` (fp32, no gradient).
- activations: the tensors autograd saves for backward, with the base frozen (a frozen linear saves nothing: its
  input gradient needs only its weight), SDPA attention (no S×S probabilities, but the additive mask/bias it is
  given is saved per layer), no dropout, padded batches (so the attention masks are materialised per layer).
  b = bytes of the compute dtype, R = rows, S = query length, K = key length, d = d_model, n = heads·head_dim,
  f = d_ff, h = heads, r = LoRA rank. Per layer:

      norm (each RMSNorm / T5LayerNorm):  fp32: R·S·d·4;  bf16: R·S·d·4 (the fp32 upcast) (+ R·S·d·2 in T5, whose
                                          norm multiplies the bf16 input itself)
      TAGI LoRA on q and v:               R·S·d·b (their shared input) + R·S·r·b per module (x·Aᵀ)
                                          + R·r·(in + out)·b per module (A and B gathered per row)
      self-attention (SDPA):              q, k, v, output: 4·R·S·n·b + log-sum-exp R·h·S·4 + mask R·h·S·K·b
                                          (T5 encoder: bias + padding mask; T5 decoder causal: 1·h·S·S·b;
                                          Llama: one shared boolean mask, GQA keys/values repeated to n)
      cross-attention (T5 decoder):       q, output 2·R·S·n·b + k, v 2·R·K·n·b + R·K·r·b (v's x·Aᵀ) + R·h·S·4
                                          + R·h·S·K·b; its K/V input (the encoder output) is saved once
      feed-forward:                       gated-GELU (T5 v1.1, `gelu_new` in Python ops): 6·R·S·f·b;
                                          gated-SiLU (Llama): 3·R·S·f·b; ReLU: R·S·f·b
      8-bit base only:                    bitsandbytes' int8 matmul saves its input: + R·S·(d + f + n)·b

  plus once per forward: the embedding output, the logits (R·S_out·V·b) and the loss terms over them
  (cross-entropy in fp32; `distill` adds the teacher's logits and the temperature-scaled KL in fp32), the generated
  LoRA weights (T·Σ r·(in + out)·4) and, in `distill`, the bank rows gathered for the ΔW alignment.
  Gradient checkpointing (non-reentrant) keeps one layer input per layer (R·S·d·b) plus one layer's full
  activations (the largest) during its recomputation.
  The peak is what is kept to the backward plus the largest of what comes and goes on top of it: the loss head
  (end of the forward, start of the backward), the recomputed layer with its output gradient (checkpointing), or,
  in `distill`, the teacher forward (no grad: one layer's live tensors of the teacher rows, the teacher's encoder
  output) next to the student's logits.

Stage workloads (`TagiTrainer`): `teachers` runs two forward passes kept to one backward (B meta rows reading
instruction + input, then B bank rows reading the input) with no fusion; `pretrain` and `distill` run the student on
B rows of the input (the decoder attends to [instruction ; input] with fusion) after encoding the unique instructions
under no_grad; `distill` adds the teacher forward on B rows of instruction + input.

Measurement (`--validate`): a real step (forward + backward + AdamW step, twice) of `TagiTrainer.compute_loss` on a
small model, in-process, with `LiveTensorTracker`: a `TorchDispatchMode` that registers the storage of every tensor
an op returns (plus the model's parameters, buffers and the batch, registered up front), drops it through a weakref
finalizer when the storage dies, and records the peak of the live bytes. It sees exactly the tensors torch creates,
on any device, without the allocator's caching or the process's libraries. `torch.distributed._tools.MemTracker`
would do the same but cannot be used here: it registers a gradient hook on every parameter and fails on the frozen
base weights of a PEFT model ("cannot register a hook on a tensor that doesn't require gradient"). Temporaries
inside a single kernel are invisible to both.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("teachers", "pretrain", "distill")
DTYPES = ("fp32", "bf16", "int8", "int4")
GIB = 2**30
GPU_SIZES_GB = (24, 40, 80)


# ---------------------------------------------------------------------------------------------------- configs


def t5_config(d_model: int, d_ff: int, num_heads: int, num_layers: int, d_kv: int = 64, vocab_size: int = 32128):
    """A T5 v1.1 / LM-adapt shaped config (gated-GELU, untied LM head), dropout off."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=num_heads, num_layers=num_layers,
        num_decoder_layers=num_layers, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip


def llama_config(
    hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, num_kv_heads: int, vocab_size: int
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip


# The real shapes of the table's models: google/t5-v1_1-* (= the LM-adapted t5-*-lm-adapt) and Meta-Llama-3-8B.
MODELS = {
    "t5-base": lambda: t5_config(768, 2048, 12, 12),
    "t5-large": lambda: t5_config(1024, 2816, 16, 24),
    "t5-3b": lambda: t5_config(2048, 5120, 32, 24),
    "t5-11b": lambda: t5_config(4096, 10240, 64, 24),
    "llama-3-8b": lambda: llama_config(4096, 14336, 32, 32, 8, 128256),
}

# Small shapes measured by --validate (and the test): real steps on the CPU in seconds.
VALIDATION_SHAPES = {
    "t5-small-ish": lambda: t5_config(128, 256, 4, 2, d_kv=32, vocab_size=512),
    "t5-wide": lambda: t5_config(192, 512, 6, 3, d_kv=32, vocab_size=1024),
    "llama-small": lambda: llama_config(128, 384, 2, 4, 2, 512),
}


@dataclass(frozen=True)
class Workload:
    """One training batch. Lengths in tokens; `num_groups` is the size of the teacher bank (tasks or categories).

    `unique_instructions` is how many distinct instructions a batch holds (each is encoded and generated once).
    """

    batch_size: int = 8
    instruction_len: int = 512
    input_len: int = 256
    output_len: int = 64
    num_groups: int = 64
    unique_instructions: int = 4
    r: int = 32
    hypernetwork_hidden_size: int = 256
    module_embedding_dim: int = 64


@dataclass(frozen=True)
class Arch:
    """The numbers of a transformers config the formula needs."""

    family: str  # "t5" or "llama"
    d_model: int
    d_ff: int
    heads: int
    kv_heads: int
    head_dim: int
    encoder_layers: int
    decoder_layers: int
    vocab_size: int
    ffn: str  # "gated-gelu", "gated-silu" or "relu"

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_inner(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config) -> Arch:
        if config.model_type == "t5":
            if config.is_gated_act and config.dense_act_fn != "gelu_new":
                raise ValueError(f"The memory model knows T5's gated gelu_new, not {config.dense_act_fn!r}.")
            return cls(
                "t5", config.d_model, config.d_ff, config.num_heads, config.num_heads, config.d_kv, config.num_layers,
                config.num_decoder_layers, config.vocab_size, "gated-gelu" if config.is_gated_act else "relu",
            )  # fmt: skip
        if config.model_type == "llama":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            return cls(
                "llama", config.hidden_size, config.intermediate_size, config.num_attention_heads,
                config.num_key_value_heads, head_dim, 0, config.num_hidden_layers, config.vocab_size, "gated-silu",
            )  # fmt: skip
        raise ValueError(f"The memory model knows T5 and Llama configs, got model_type={config.model_type!r}.")


# ---------------------------------------------------------------------------------------------------- parameters


def tagi_config_for(config, workload: Workload):
    from peft_tagi import TagiConfig

    task_type = "SEQ_2_SEQ_LM" if config.is_encoder_decoder else "CAUSAL_LM"
    return TagiConfig(
        task_type=task_type, r=workload.r, lora_alpha=2 * workload.r,
        hypernetwork_hidden_size=workload.hypernetwork_hidden_size,
        module_embedding_dim=workload.module_embedding_dim,
        max_instruction_length=max(1024, workload.instruction_len),
    )  # fmt: skip


def build_tagi(config, workload: Workload, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """`get_peft_model(model_from_config, TagiConfig)`; on `"meta"` nothing is allocated (t5-11b costs nothing).

    The base is cast to `dtype` before the adapter is added, as when it is loaded in that dtype (the hypernetwork
    then stays in float32).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device(device):
        base = auto.from_config(config).to(dtype)
        model = get_peft_model(base, tagi_config_for(config, workload))
    return model


def count_parameters(config, workload: Workload) -> dict:
    """Exact parameter counts from a TAGI model built on the meta device.

    Returns base (all), base_quantizable (the `nn.Linear` weights inside the blocks, which bitsandbytes quantizes;
    the LM head is kept), quantized_rows (their output rows: one int8 scale each), hypernetwork, lora_per_entry
    (Σ over target modules of r·(in + out): one LoRA of the bank) and the target shapes.
    """
    model = build_tagi(config, workload, "meta")
    tagi = model.base_model
    base = tagi.model
    lm_head = base.get_output_embeddings()
    quantizable = rows = 0
    for module in base.modules():
        if isinstance(module, torch.nn.Linear) and module is not lm_head:
            quantizable += module.weight.numel()
            rows += module.weight.shape[0]
    r = workload.r
    targets = tagi.target_specs
    return {
        "base": sum(p.numel() for p in base.parameters()),
        "base_quantizable": quantizable,
        "quantized_rows": rows,
        "hypernetwork": sum(p.numel() for p in tagi.tagi_hypernetwork.parameters()),
        "lora_per_entry": sum(r * (t.in_features + t.out_features) for t in targets),
        "target_modules": len(targets),
    }


# ---------------------------------------------------------------------------------------------------- the model


def _norm_bytes(arch: Arch, tokens: int, dtype: str) -> int:
    """Saved by one RMSNorm over `tokens` rows·positions."""
    if dtype == "fp32":
        return tokens * arch.d_model * 4
    return tokens * arch.d_model * (4 + (2 if arch.family == "t5" else 0))


def _lora_bytes(arch: Arch, rows: int, q_tokens: int, v_tokens: int, r: int, b: int, q_out: int, v_out: int) -> int:
    """TAGI's q and v updates: x·Aᵀ per module and the per-row gathered A and B (their shared input is counted apart)."""
    d = arch.d_model
    return (q_tokens + v_tokens) * r * b + rows * r * ((d + q_out) + (d + v_out)) * b


def _ffn_bytes(arch: Arch, tokens: int, b: int) -> int:
    factor = {"gated-gelu": 6, "gated-silu": 3, "relu": 1}[arch.ffn]
    return factor * tokens * arch.d_ff * b


def layer_activation_bytes(arch: Arch, kind: str, rows: int, q_len: int, kv_len: int, dtype: str, r: int) -> int:
    """Bytes one layer saves for backward (see the module docstring). kind: encoder | decoder | causal."""
    b = 4 if dtype == "fp32" else 2
    d, n, h = arch.d_model, arch.inner, arch.heads
    tokens = rows * q_len
    int8_extra = tokens * (d + arch.d_ff) * b if dtype == "int8" else 0
    total = 0
    # self-attention sublayer
    total += _norm_bytes(arch, tokens, dtype) + tokens * d * b
    total += _lora_bytes(arch, rows, tokens, tokens, r, b, n, arch.kv_inner)
    total += 4 * tokens * n * b + rows * h * q_len * 4
    if kind == "encoder":
        total += rows * h * q_len * q_len * b
    elif kind == "decoder":
        total += h * q_len * q_len * b  # causal bias, the same for every row
    total += tokens * n * b if dtype == "int8" else 0
    if kind == "decoder":  # cross-attention over kv_len encoder states
        kv_tokens = rows * kv_len
        total += _norm_bytes(arch, tokens, dtype) + tokens * d * b
        total += _lora_bytes(arch, rows, tokens, kv_tokens, r, b, n, n)
        total += 2 * tokens * n * b + 2 * kv_tokens * n * b + rows * h * q_len * 4 + rows * h * q_len * kv_len * b
        total += tokens * n * b if dtype == "int8" else 0
    total += _norm_bytes(arch, tokens, dtype) + _ffn_bytes(arch, tokens, b) + int8_extra
    return total


def _stack_activations(
    arch: Arch, rows: int, enc_len: int, dec_len: int, kv_len: int, dtype: str, r: int, checkpointing: bool
) -> int:
    """Saved activations of one forward through the blocks (no head): (kept to the backward, one recomputed layer).

    Without checkpointing everything is kept and nothing recomputed; with it, each layer's input is kept and the
    largest layer's activations exist again while it is recomputed in the backward.
    """
    b = 4 if dtype == "fp32" else 2
    d = arch.d_model
    if arch.family == "t5":
        layers = [("encoder", rows, enc_len, enc_len)] * arch.encoder_layers
        layers += [("decoder", rows, dec_len, kv_len)] * arch.decoder_layers
        shared = rows * kv_len * d * b  # the decoder's K/V input (encoder output, with fusion its concatenation)
    else:
        layers = [("causal", rows, dec_len, dec_len)] * arch.decoder_layers
        shared = rows * dec_len * dec_len  # the boolean padding + causal mask
    full = [layer_activation_bytes(arch, *layer[:1], *layer[1:], dtype=dtype, r=r) for layer in layers]
    if not checkpointing:
        return sum(full) + shared, 0
    inputs = sum(rows_ * q * d * b for _, rows_, q, _ in layers)
    return inputs + shared, max(full)


def _head_bytes(arch: Arch, rows: int, positions: int, label_len: int, teacher_positions: int, dtype: str, stage: str):
    """Logits and the loss terms over them, at the end of the forward and the start of the backward."""
    b = 4 if dtype == "fp32" else 2
    logits = rows * positions * arch.vocab_size
    # logits (compute dtype) + fp32 upcast for the loss (bf16 only) + log-softmax output (fp32) + its gradient (fp32)
    total = logits * b + (logits * 4 if b != 4 else 0) + 2 * logits * 4
    if stage == "distill":
        # the teacher's logits (compute dtype); over the label tokens only, the fp32 log-softmax of student and
        # teacher (saved for the KL's backward) and the KL's elementwise terms
        total += rows * teacher_positions * arch.vocab_size * b + 3 * rows * label_len * arch.vocab_size * 4
    return total


def predict(config, workload: Workload, stage: str, dtype: str, checkpointing: bool, counts: dict | None = None):
    """Predicted peak bytes of one `stage` step, by component (see the module docstring)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    arch = Arch.from_config(config)
    counts = counts or count_parameters(config, workload)
    w = workload
    b = 4 if dtype == "fp32" else 2
    base, quant = counts["base"], counts["base_quantizable"]
    if dtype in ("fp32", "bf16"):
        weights = base * b
    elif dtype == "int8":
        weights = quant + counts["quantized_rows"] * 4 + (base - quant) * 2
    else:
        weights = quant // 2 + math.ceil(quant / 64) * 4 + (base - quant) * 2
    lora = counts["lora_per_entry"]
    hyper = counts["hypernetwork"]
    if stage == "teachers":
        trainable = (1 + w.num_groups) * lora
        frozen_extra = hyper * 4
    else:
        trainable = hyper
        frozen_extra = (1 + w.num_groups) * lora * 4 if stage == "distill" else 0
    # 16 B per trainable parameter (param, grad, two moments) + the foreach AdamW temporary
    trainable_state = trainable * 16
    optimizer_temporary = trainable * 4

    seq2seq = arch.family == "t5"
    teacher_positions = w.output_len if seq2seq else w.instruction_len + w.input_len + w.output_len
    # (rows, encoder length, length the cross-attention reads) of each forward pass kept to the step's one backward
    if stage == "teachers":
        # TagiTrainer._teachers_loss: B meta rows reading instruction + input, then B bank rows reading the input
        passes = [(w.batch_size, n, n) for n in (w.instruction_len + w.input_len, w.input_len)]
    else:
        passes = [(w.batch_size, w.input_len, w.instruction_len + w.input_len)]
    blocks = recomputed = embeddings = head = 0
    for rows, enc_len, kv_len in passes:
        dec_len = w.output_len if seq2seq else enc_len + w.output_len
        positions = w.output_len if seq2seq else dec_len
        kept_pass, recomputed_pass = _stack_activations(
            arch, rows, enc_len, dec_len, kv_len, dtype, w.r, checkpointing
        )
        if checkpointing:
            # the logits' gradient is gone before the last layer is recomputed; that layer's activations then exist
            # next to the gradient of its output
            recomputed_pass += rows * max(enc_len, dec_len) * arch.d_model * b
        blocks += kept_pass
        recomputed = max(recomputed, recomputed_pass)
        embeddings += rows * (enc_len + dec_len if seq2seq else dec_len) * arch.d_model * b
        head = max(head, _head_bytes(arch, rows, positions, w.output_len, teacher_positions, dtype, stage))
    # an earlier pass's loss keeps its fp32 log-softmax over the label tokens to the backward
    blocks += sum(rows * w.output_len * arch.vocab_size * 4 for rows, _, _ in passes[:-1])
    generated = 0
    if stage != "teachers":
        generated = w.unique_instructions * lora * 4 * (2 if stage == "distill" else 1)  # + gathered bank rows
    kept = blocks + embeddings + generated
    teacher = 0
    if stage == "distill":
        # no grad: nothing is saved, the working set is one layer's live tensors (hidden, normed, q/k/v/output, the
        # mask, two feed-forward intermediates) plus, for T5, the teacher's encoder output kept for its decoder
        t_len = w.instruction_len + w.input_len + (0 if seq2seq else w.output_len)
        t_tokens = w.batch_size * t_len
        teacher = t_tokens * (2 * arch.d_model + 4 * arch.inner + 2 * arch.d_ff) * b
        # T5: the per-layer float bias + mask; Llama: one shared boolean mask
        teacher += w.batch_size * t_len * t_len * (arch.heads * b if seq2seq else 1)
        teacher += t_tokens * arch.d_model * b if seq2seq else 0
    dequantized = 0
    if dtype in ("int8", "int4"):
        # bitsandbytes dequantizes one weight at a time to the compute dtype (backward for int8; forward for 4-bit)
        dequantized = max(arch.d_model * arch.d_ff, arch.d_model * arch.inner) * 2
    # The largest of what comes and goes on top of the kept activations: the loss head (end of the forward, start of
    # the backward), the recomputed layer (checkpointing) or the teacher forward next to the student's logits.
    student_logits = rows * positions * arch.vocab_size * b
    transient = max(head, recomputed, teacher + student_logits if teacher else 0)
    activations = kept + transient
    step_peak = activations + dequantized
    peak = (
        weights + frozen_extra + trainable * 12 + max(step_peak + trainable * 4, optimizer_temporary + trainable * 4)
    )
    return {
        "weights": weights,
        "trainable_params": trainable,
        "trainable_state": trainable_state,
        "frozen_extra": frozen_extra,
        "activations": activations,
        "teacher_forward": teacher,
        "dequantized_weight": dequantized,
        "peak": peak,
    }


# ---------------------------------------------------------------------------------------------------- measurement


class LiveTensorTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages while the mode is active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _forget(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def register(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        nbytes = storage.nbytes()
        known = self._sizes.get(key)
        if known is None:
            if nbytes == 0:
                return
            self._sizes[key] = nbytes
            self.live += nbytes
            weakref.finalize(storage, self._forget, key)
        elif known != nbytes:  # resized in place
            self._sizes[key] = nbytes
            self.live += nbytes - known
        self.peak = max(self.peak, self.live)

    def register_all(self, *objects) -> None:
        for leaf in tree_flatten(objects)[0]:
            if isinstance(leaf, torch.nn.Module):
                for tensor in (*leaf.parameters(), *leaf.buffers()):
                    self.register(tensor)
            else:
                self.register(leaf)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            self.register(leaf)
        return out


def _batch(config, workload: Workload, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A padded batch in the collator's format (row 0 is 3 tokens short everywhere: masks are materialised)."""
    w = workload
    vocab = config.vocab_size
    b = w.batch_size
    task_of_row = torch.arange(b) % w.unique_instructions

    def ids(n, length):
        return torch.randint(3, vocab, (n, length), generator=generator)

    def padded(tensor):
        mask = torch.ones_like(tensor)
        mask[0, -3:] = 0
        return tensor.masked_fill(mask == 0, 0), mask

    instructions, instruction_mask = padded(ids(w.unique_instructions, w.instruction_len)[task_of_row])
    inputs, input_mask = padded(ids(b, w.input_len))
    teacher = torch.cat([instructions, inputs], dim=1)
    teacher_mask = torch.cat([instruction_mask, input_mask], dim=1)
    labels = ids(b, w.output_len)
    labels[0, -3:] = -100
    batch = {
        "instruction_input_ids": instructions,
        "instruction_attention_mask": instruction_mask,
        "task_index": task_of_row % w.num_groups,
    }
    if config.is_encoder_decoder:
        batch.update(input_ids=inputs, attention_mask=input_mask, labels=labels, teacher_input_ids=teacher,
                     teacher_attention_mask=teacher_mask)  # fmt: skip
    else:
        student = torch.cat([inputs, labels.clamp_min(0)], dim=1)
        student_mask = torch.cat([input_mask, (labels >= 0).long()], dim=1)
        student_labels = torch.cat([torch.full_like(inputs, -100), labels], dim=1)
        full = torch.cat([teacher, labels.clamp_min(0)], dim=1)
        full_mask = torch.cat([teacher_mask, (labels >= 0).long()], dim=1)
        batch.update(
            input_ids=student, attention_mask=student_mask, labels=student_labels, teacher_input_ids=full,
            teacher_attention_mask=full_mask, teacher_labels=torch.cat([torch.full_like(teacher, -100), labels], 1),
        )  # fmt: skip
    return batch


def _trainer(model, stage: str, workload: Workload, work_dir: Path, teachers: Path | None, use_cpu: bool = True):
    from datasets import Dataset

    from peft_tagi import TagiTrainer, TagiTrainingArguments

    groups = [f"g{i}" for i in range(workload.num_groups)]
    rows = [{"task_name": g, "category": g, "instruction": "x", "input": "y", "output": "z"} for g in groups]
    args = TagiTrainingArguments(
        output_dir=str(work_dir / stage), stage=stage, report_to=[], use_cpu=use_cpu, learning_rate=1e-4,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    return TagiTrainer(
        model, args, train_dataset=Dataset.from_list(rows), data_collator=lambda rows: rows, teachers=teachers
    )


def measure(
    config,
    workload: Workload,
    stage: str,
    dtype: str = "fp32",
    checkpointing: bool = False,
    steps: int = 2,
    device: str = "cpu",
) -> dict:
    """Peak bytes of `steps` real steps of `stage` (TagiTrainer.compute_loss, backward, AdamW step).

    `peak`: live tensor storages (`LiveTensorTracker`), weights included. On CUDA also `cuda_peak`:
    `torch.cuda.max_memory_allocated()` over the steps (the model and the batch already on the device).
    """
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"measure() runs fp32 or bf16 bases, got {dtype!r}; 8-bit and 4-bit are predicted only.")
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        model = build_tagi(config, workload, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        teachers = None
        if stage == "distill":
            # the teachers folder of a (random) stage-1 run, written and read like the real one
            teachers_trainer = _trainer(build_tagi(config, workload), "teachers", workload, work_dir, None)
            teachers = teachers_trainer.save_teachers(work_dir / "teachers")
            del teachers_trainer
        model = model.to(device)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = _trainer(model, stage, workload, work_dir, teachers, use_cpu=device.type == "cpu")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batch = {k: v.to(device) for k, v in _batch(config, workload, generator).items()}
        tracker = LiveTensorTracker()
        tracker.register_all(model, trainer._bank_weights, trainer._meta_weights, batch)
        at_start = tracker.live
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        with tracker:
            for _ in range(steps):
                loss = trainer.compute_loss(model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                del loss
        result = {"peak": tracker.peak, "at_start": at_start, "after": tracker.live, "losses": losses}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            result["cuda_peak"] = torch.cuda.max_memory_allocated(device)
        return result


# ---------------------------------------------------------------------------------------------------- reports


def validate(shapes: dict, workload: Workload, settings: list[tuple[str, str, bool]]) -> list[dict]:
    rows = []
    for name, make in shapes.items():
        config = make()
        counts = count_parameters(config, workload)
        for stage, dtype, checkpointing in settings:
            start = time.perf_counter()
            measured = measure(config, workload, stage, dtype, checkpointing)
            predicted = predict(config, workload, stage, dtype, checkpointing, counts)
            rows.append(
                {
                    "shape": name, "stage": stage, "dtype": dtype, "checkpointing": checkpointing,
                    "measured_bytes": measured["peak"], "predicted_bytes": predicted["peak"],
                    "predicted_over_measured": predicted["peak"] / measured["peak"],
                    "predicted": predicted, "seconds": time.perf_counter() - start,
                }
            )  # fmt: skip
    return rows


def fits(peak: int) -> dict[str, bool]:
    """Whether a peak fits on a GPU of each size (GB = 10⁹ B as sold; ~0.5 GiB left for the CUDA context)."""
    return {f"{gb}GB": peak + 0.5 * GIB <= gb * 1e9 for gb in GPU_SIZES_GB}


def table(models: list[str], workload: Workload, stages=STAGES) -> list[dict]:
    rows = []
    for name in models:
        config = MODELS[name]()
        counts = count_parameters(config, workload)
        for stage in stages:
            for dtype in DTYPES:
                for checkpointing in (False, True):
                    p = predict(config, workload, stage, dtype, checkpointing, counts)
                    rows.append({"model": name, "stage": stage, "dtype": dtype, "checkpointing": checkpointing,
                                 "peak_bytes": p["peak"], "components": p, "fits": fits(p["peak"]),
                                 "params": counts})  # fmt: skip
    return rows


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<11} {'stage':<9} {'dtype':<5} {'ckpt':<4} {'peak GiB':>9} {'weights':>8} {'train st':>8} "
    header += f"{'act':>7}  fits 24/40/80 GB"
    print(header)
    for row in rows:
        c = row["components"]
        marks = " ".join("yes" if v else " no" for v in row["fits"].values())
        print(
            f"{row['model']:<11} {row['stage']:<9} {row['dtype']:<5} {'on' if row['checkpointing'] else 'off':<4} "
            f"{_gib(row['peak_bytes']):>9} {_gib(c['weights']):>8} {_gib(c['trainable_state']):>8} "
            f"{_gib(c['activations']):>7}  {marks}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=Workload.batch_size)
    parser.add_argument("--instruction-len", type=int, default=Workload.instruction_len)
    parser.add_argument("--input-len", type=int, default=Workload.input_len)
    parser.add_argument("--output-len", type=int, default=Workload.output_len)
    parser.add_argument("--num-groups", type=int, default=Workload.num_groups, help="LoRAs in the teacher bank")
    parser.add_argument("--validate", action="store_true", help="measure real CPU steps on small shapes too")
    parser.add_argument("--validate-settings", nargs="+", default=["fp32:off", "fp32:on", "bf16:off", "bf16:on"],
                        help="dtype:checkpointing pairs to validate, e.g. fp32:off fp32:on bf16:off")  # fmt: skip
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    workload = Workload(
        batch_size=args.batch_size, instruction_len=args.instruction_len, input_len=args.input_len,
        output_len=args.output_len, num_groups=args.num_groups,
    )  # fmt: skip
    report: dict = {
        "workload": asdict(workload),
        "assumptions": __doc__.split("What is counted")[1].split("Measure")[0],
    }
    if args.validate:
        small = replace(workload, batch_size=4, instruction_len=24, input_len=16, output_len=8, num_groups=6,
                        unique_instructions=2, r=8, hypernetwork_hidden_size=32, module_embedding_dim=16)  # fmt: skip
        settings = []
        for item in args.validate_settings:
            dtype, ckpt = item.split(":")
            settings += [(stage, dtype, ckpt == "on") for stage in STAGES]
        rows = validate(VALIDATION_SHAPES, small, settings)
        report["validation"] = {"workload": asdict(small), "rows": rows}
        print(f"validation (real CPU steps, workload {asdict(small)}):")
        print(f"{'shape':<13} {'stage':<9} {'dtype':<5} {'ckpt':<4} {'measured KiB':>12} {'predicted KiB':>13} ratio")
        for row in rows:
            print(
                f"{row['shape']:<13} {row['stage']:<9} {row['dtype']:<5} {'on' if row['checkpointing'] else 'off':<4} "
                f"{row['measured_bytes'] / 1024:>12.0f} {row['predicted_bytes'] / 1024:>13.0f} "
                f"{row['predicted_over_measured']:.3f}"
            )
        worst = max(abs(row["predicted_over_measured"] - 1) for row in rows)
        report["validation"]["worst_relative_error"] = worst
        print(f"worst |predicted/measured - 1| = {worst:.3f}")
    rows = table(args.models, workload)
    report["table"] = rows
    print(
        f"\npredicted peak per training step: batch {workload.batch_size}, instruction {workload.instruction_len}, "
        f"input {workload.input_len}, output {workload.output_len} tokens, r={workload.r}, bank of "
        f"{workload.num_groups} LoRAs, AdamW, TAGI defaults"
    )
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
