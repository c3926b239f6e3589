"""Shared-prefix cross-attention: the decoder attends to [instruction ; input] with the instruction read once per task.

With instruction fusion the decoder cross-attends to the concatenation of the task's instruction states (S_ins tokens)
and each row's encoder states (S_in tokens). Attending to that concatenation as it is would give every row its own
copy of the instruction's keys and values: projected per row, kept per row in transformers' cross-attention cache,
and read per row at every decoding step. On the serving route (no gradients) the cross-attention modules listed in
`CROSS_ATTENTION_LAYOUTS` run `shared_prefix_cross_attention` instead:

- transformers' cache keeps each row's input part only, (N, H, S_in, d), as for the base model;
- the instruction's keys and values are projected once per task and cross-attention module, (T, H, S_ins, d)
  (`project_instruction`), and cached with the applied task weights for every row, batch and decoding step;
- every row's queries are scored against its task's instruction keys (for one task: all rows in one matmul per head,
  the instruction's keys read once) and against its own input keys; one softmax over both parts gives the attention
  over the concatenation.

Training keeps the concatenated route: gradients must reach the instruction states of each row.

`InstructionFusion` is the mechanism as one object: it installs itself on a model (the decoder's pre-hook and the
cross-attention forwards), chooses the route at each decoder call, and removes itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.utils import logging

from .layer import TagiLinear, TaskWeights

logger = logging.get_logger(__name__)

# The attention implementations whose cross-attention mask `shared_prefix_attention` reads: None, boolean (True:
# attend) or additive float. Others (flash, flex) keep the concatenated route.
SHARED_PREFIX_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class CrossAttentionLayout:
    """Where a model family keeps the parts of its decoder's cross-attention modules.

    Args:
        module_suffix (`str`): name of the cross-attention module inside a decoder layer.
        query, key, value, output (`str`): names of its four projections.
        head_dim (`str`): name of its attribute holding the size of one head.
        mask_argument (`str`): name of the forward argument that carries the cross-attention mask.
        returns_position_bias (`bool`): True when the forward returns (output, position_bias, weights) as T5's does,
            False for (output, weights) as BART's.
    """

    module_suffix: str
    query: str
    key: str
    value: str
    output: str
    head_dim: str
    mask_argument: str
    returns_position_bias: bool


_T5 = CrossAttentionLayout("EncDecAttention", "q", "k", "v", "o", "key_value_proj_dim", "mask", True)
_BART = CrossAttentionLayout(
    "encoder_attn", "q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "attention_mask", False
)
# model_type -> layout. Only families whose cross-attention forward is T5Attention's or BartAttention's (or a copy):
# `shared_prefix_cross_attention` replaces that forward. Others attend to the concatenation (correct, slower).
CROSS_ATTENTION_LAYOUTS: dict[str, CrossAttentionLayout] = {"t5": _T5, "mt5": _T5, "bart": _BART, "mbart": _BART}


@dataclass
class InstructionKV:
    """Each task's instruction projected for one cross-attention module.

    Shapes: key, value (T, H, S_ins, d); mask (T, 1, 1, S_ins), additive (0 on a token, the dtype's minimum on
    padding), or None when no instruction has padding.
    """

    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None


def project_instruction(
    module: nn.Module, layout: CrossAttentionLayout, states: torch.Tensor, states_mask: torch.Tensor
) -> InstructionKV:
    """Project the instruction states of every task, (T, S_ins, d_model), to the module's keys and values.

    A TAGI-targeted projection applies task t's LoRA to task t's instruction, as the projection of a row's
    concatenation does under that row's weights.
    """
    head_dim = getattr(module, layout.head_dim)
    heads = []
    for name in (layout.key, layout.value):
        projection = getattr(module, name)
        project = projection.forward_per_task if isinstance(projection, TagiLinear) else projection
        heads.append(project(states).view(*states.shape[:2], -1, head_dim).transpose(1, 2))
    mask = None
    if not bool(states_mask.all()):
        padding = states_mask[:, None, None, :] == 0
        mask = torch.zeros(padding.shape, dtype=states.dtype, device=states.device)
        mask = mask.masked_fill(padding, torch.finfo(states.dtype).min)
    return InstructionKV(key=heads[0], value=heads[1], mask=mask)


def shared_prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    instruction_key: torch.Tensor,
    instruction_value: torch.Tensor,
    instruction_mask: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row over [instruction ; its input], the instruction's keys and values given apart.

    Args:
        query: (N, H, q, d). key, value: (N, H, S_in, d), each row's input part.
        mask: the input part's mask, broadcastable to (N, H, q, S_in): None, boolean (True: attend) or additive.
        instruction_key, instruction_value: (1, H, S_ins, d), one instruction that every row reads, or
            (N, H, S_ins, d), each row's own.
        instruction_mask: additive, (1 or N, 1, 1, S_ins), or None.
        scaling: the factor of the query-key dot products.

    Returns:
        The attention output (N, q, H, d) and its weights (N, H, q, S_ins + S_in).
    """
    n, heads, q_len, head_dim = query.shape
    if scaling != 1.0:
        query = query * scaling  # (N, H, q, d) is the smallest tensor to scale
    ins_len = instruction_key.shape[2]
    shared = instruction_key.shape[0] == 1 and n > 1
    if shared:
        # All rows read the same instruction: fold the rows into the query length, (H, N * q, d) @ (H, d, S_ins),
        # so that each head's instruction keys are read once, not once per row.
        folded = query.transpose(0, 1).reshape(heads, n * q_len, head_dim)
        ins_scores = torch.matmul(folded, instruction_key[0].transpose(1, 2))
        ins_scores = ins_scores.view(heads, n, q_len, ins_len).transpose(0, 1)
    else:
        ins_scores = torch.matmul(query, instruction_key.transpose(2, 3))
    if instruction_mask is not None:
        ins_scores = ins_scores + instruction_mask
    in_scores = torch.matmul(query, key.transpose(2, 3))
    if mask is not None:
        if mask.dtype == torch.bool:
            in_scores = in_scores.masked_fill(~mask, torch.finfo(in_scores.dtype).min)
        else:
            in_scores = in_scores + mask
    # One softmax over both parts: the weights of attending to the concatenation.
    weights = torch.softmax(torch.cat([ins_scores, in_scores], dim=-1), dim=-1, dtype=torch.float32).to(query.dtype)
    ins_weights, in_weights = weights[..., :ins_len], weights[..., ins_len:]
    if shared:
        folded = ins_weights.transpose(0, 1).reshape(heads, n * q_len, ins_len)
        output = torch.matmul(folded, instruction_value[0]).view(heads, n, q_len, head_dim).transpose(0, 1)
    else:
        output = torch.matmul(ins_weights, instruction_value)
    output = output + torch.matmul(in_weights, value)
    return output.transpose(1, 2), weights


def concatenation_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    with_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of each row over its own [instruction ; input] keys and values, (N, H, S_ins + S_in, d).

    mask: additive, broadcastable to (N, H, q, S_ins + S_in), or None. Returns the output (N, q, H, d) and, with
    `with_weights` (as eager attention does), the weights; otherwise torch's fused kernel and None (as sdpa does).
    """
    if not with_weights:
        output = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return output.transpose(1, 2), None
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2), weights


def _concatenation_mask(
    instruction_mask: torch.Tensor | None, mask: torch.Tensor | None, key: torch.Tensor, ins_len: int
) -> torch.Tensor | None:
    """The additive mask of [instruction ; input] keys, (N, 1, q or 1, S_ins + S_in), from the instruction's
    (N, 1, 1, S_ins) additive mask and the input part's (None, boolean or additive); None when nothing is masked."""
    if instruction_mask is None and mask is None:
        return None
    n, in_len = key.shape[0], key.shape[2] - ins_len
    if mask is None:
        mask = torch.zeros((n, 1, 1, in_len), dtype=key.dtype, device=key.device)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=key.dtype, device=key.device).masked_fill(
            ~mask, torch.finfo(key.dtype).min
        )
    if instruction_mask is None:
        instruction_mask = torch.zeros((n, 1, 1, ins_len), dtype=key.dtype, device=key.device)
    q_len = max(mask.shape[2], instruction_mask.shape[2])
    return torch.cat([instruction_mask.expand(n, 1, q_len, ins_len), mask.expand(n, 1, q_len, in_len)], dim=-1)


def shared_prefix_cross_attention(
    module: nn.Module,
    layout: CrossAttentionLayout,
    instruction: InstructionKV,
    rows: torch.Tensor,
    hidden_states: torch.Tensor,
    key_value_states: torch.Tensor,
    mask: torch.Tensor | None,
    cache,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of a cross-attention module (T5Attention / BartAttention) over [instruction ; input].

    hidden_states: (N, q, d_model) decoder states; key_value_states: (N, S_in, d_model), the input part only; rows:
    (N,) the task of every row. The input part's keys and values go through transformers' cross-attention cache as
    in the module's own forward (projected at the first decoding step, read from the cache afterwards). With one
    task, every row reads `instruction`'s keys and values and the cache holds the input part only. With several, the
    cache holds each row's [instruction ; input] (its task's instruction copied once per `generate` call, at the first
    step) and each row attends to its own: reading a shared instruction per task would take a pass over the rows of
    each task at every step.

    Returns the projected attention output (N, q, d_model) and the weights (N, H, q, S_ins + S_in), or None for
    several tasks under sdpa attention (as the module's own sdpa forward).
    """
    input_shape = hidden_states.shape[:-1]
    head_dim = getattr(module, layout.head_dim)
    query = getattr(module, layout.query)(hidden_states).view(*input_shape, -1, head_dim).transpose(1, 2)
    one_task = instruction.key.shape[0] == 1
    is_updated = False
    layer_cache = cache
    if isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(module.layer_idx)
        layer_cache = cache.cross_attention_cache
    if cache is not None and is_updated:
        key = layer_cache.layers[module.layer_idx].keys
        value = layer_cache.layers[module.layer_idx].values
    else:
        kv_shape = (*key_value_states.shape[:-1], -1, head_dim)
        key = getattr(module, layout.key)(key_value_states).view(kv_shape).transpose(1, 2)
        value = getattr(module, layout.value)(key_value_states).view(kv_shape).transpose(1, 2)
        if not one_task:
            key = torch.cat([instruction.key[rows], key], dim=2)
            value = torch.cat([instruction.value[rows], value], dim=2)
        if cache is not None:
            key, value = layer_cache.update(key, value, module.layer_idx, kwargs=kwargs)
            if isinstance(cache, EncoderDecoderCache):
                cache.is_updated[module.layer_idx] = True
    if one_task:
        output, weights = shared_prefix_attention(
            query, key, value, mask, instruction.key, instruction.value, instruction.mask, module.scaling
        )
    else:
        ins_mask = None if instruction.mask is None else instruction.mask[rows]
        output, weights = concatenation_attention(
            query, key, value, _concatenation_mask(ins_mask, mask, key, instruction.key.shape[2]), module.scaling,
            with_weights=module.config._attn_implementation == "eager",
        )  # fmt: skip
    output = getattr(module, layout.output)(output.reshape(*input_shape, -1))
    return output, weights


class InstructionFusion:
    """Instruction fusion on one encoder-decoder model: the decoder cross-attends to [instruction ; input].

    Installing it registers a forward pre-hook on the decoder and, for the model families of `CROSS_ATTENTION_LAYOUTS`
    whose cross-attention has no position bias, replaces the `forward` of each decoder cross-attention module by an
    instance attribute (as accelerate's hooks do: the modules, their parameters and state dict keys stay transformers'
    own) that wraps whatever forward the module had. `remove()` puts every forward back and removes the hook.

    The owner tells it what to attend to: `task` (the applied `TaskWeights`, whose `states` and `states_mask` are the
    instructions, or None) and `enabled` (False inside `disable_adapter()`). Before each decoder call the instruction
    part takes one of two routes, with equal outputs:

    - without gradients (generation, evaluation) in eval mode, with a known cross-attention layout and eager or sdpa
      attention: the decoder gets the encoder states alone and each cross-attention module adds the instruction's keys
      and values, projected once per task and shared by every row (`shared_prefix_cross_attention`). Serving pays for
      the instruction once per task, not once per row and decoding step;
    - otherwise every row attends to its concatenation, built by the pre-hook. Training generates new weights at every
      step, so nothing could be reused across calls, and gradients must reach each row's instruction states.

    Args:
        model: the encoder-decoder transformers model (`get_decoder()` and `config.model_type`).

    Attributes:
        modules (`list[nn.Module]`): the cross-attention modules that take the shared route.
        shares_instruction_kv (`bool`): whether the shared route is taken at all (False: every row always attends to
            its own concatenation, which is also the reference the shared route is tested against).
    """

    def __init__(self, model: nn.Module) -> None:
        self.task: TaskWeights | None = None
        self.enabled = True
        # Task of every decoder row while the cross-attention modules attend to the shared instruction keys and values
        # (set by the pre-hook at each decoder call; None when the decoder reads the concatenation).
        self._rows: torch.Tensor | None = None
        decoder = model.get_decoder()
        self._handle = decoder.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        layout = CROSS_ATTENTION_LAYOUTS.get(model.config.model_type)
        suffix = None if layout is None else f".{layout.module_suffix}"
        modules = [m for name, m in decoder.named_modules() if suffix is not None and name.endswith(suffix)]
        if any(getattr(m, "has_relative_attention_bias", False) for m in modules):
            modules = []  # a position bias over the instruction's keys: only the concatenation has it right
        # The forward each module had as an instance attribute before (an accelerate hook's, for one), or None.
        self._previous_forwards: list[Callable | None] = []
        for module in modules:
            self._previous_forwards.append(vars(module).get("forward"))
            module.forward = functools.partial(self._cross_attention_forward, module, layout, module.forward)
        self.modules = modules
        self.shares_instruction_kv = bool(modules)
        if not modules:
            logger.info(
                f"Instruction fusion on {type(model).__name__}: its cross-attention is not in CROSS_ATTENTION_LAYOUTS, "
                "so every row attends to its own copy of the instruction (correct, slower)."
            )

    def remove(self) -> None:
        """Uninstall: the decoder and its cross-attention modules get their own forwards back."""
        self._handle.remove()
        for module, previous in zip(self.modules, self._previous_forwards):
            if previous is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = previous
        self.modules, self._previous_forwards = [], []
        self.shares_instruction_kv = False
        self.task, self._rows = None, None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """Before each decoder call: the decoder attends to [instruction states ; encoder states] of each row's task."""
        self._rows = None
        task = self.task
        encoder_states = kwargs.get("encoder_hidden_states")
        if task is None or task.states is None or not self.enabled or encoder_states is None:
            return None
        n_rows = encoder_states.shape[0]
        index = task.row_index
        if index is None:
            index = torch.zeros(1, dtype=torch.long, device=encoder_states.device)
        if n_rows % index.shape[0]:
            raise ValueError(f"The decoder got {n_rows} rows for {index.shape[0]} instructions.")
        # Beam search and num_return_sequences repeat each row consecutively.
        index = index.repeat_interleave(n_rows // index.shape[0])
        if (
            self.shares_instruction_kv
            and not torch.is_grad_enabled()
            and not module.training
            # the implementation the cross-attention modules themselves read (T5's decoder has its own config)
            and self.modules[0].config._attn_implementation in SHARED_PREFIX_ATTENTION_IMPLEMENTATIONS
        ):
            self._rows = index
            return None
        if index.shape[0] > 1 and task.states.shape[0] == 1:
            states, states_mask = task.states.expand(n_rows, -1, -1), task.states_mask.expand(n_rows, -1)
        else:
            # index_select: rows of one instruction sum their gradients in a fixed order (see TagiLinear._forward).
            states, states_mask = task.states.index_select(0, index), task.states_mask.index_select(0, index)
        encoder_mask = kwargs.get("encoder_attention_mask")
        if encoder_mask is None:
            encoder_mask = torch.ones(encoder_states.shape[:2], dtype=states_mask.dtype, device=states_mask.device)
        kwargs["encoder_hidden_states"] = torch.cat([states.to(encoder_states.dtype), encoder_states], dim=1)
        kwargs["encoder_attention_mask"] = torch.cat([states_mask.to(encoder_mask.dtype), encoder_mask], dim=1)
        return args, kwargs

    def _cross_attention_forward(
        self,
        module: nn.Module,
        layout: CrossAttentionLayout,
        own_forward: Callable,
        hidden_states: torch.Tensor,
        *args,
        **kwargs,
    ):
        """The forward of a decoder cross-attention module: its own (`own_forward`), or, while the pre-hook chose the
        shared route for this decoder call, attention over [instruction ; input] with the instruction's keys and
        values projected once per task and cross-attention module (cached in the applied `TaskWeights`)."""
        rows = self._rows
        if rows is None:
            return own_forward(hidden_states, *args, **kwargs)
        if args:
            raise TypeError(
                f"{type(module).__name__} was called with positional arguments {len(args)} after hidden_states; TAGI's "
                "shared instruction attention expects keywords, as transformers' decoder layers pass them."
            )
        key_value_states = kwargs.pop("key_value_states", None)
        if key_value_states is None:
            raise ValueError(f"{type(module).__name__} is a cross-attention module but got no key_value_states.")
        if rows.shape[0] != key_value_states.shape[0]:
            raise ValueError(
                f"A cross-attention module got {key_value_states.shape[0]} rows but the decoder call {rows.shape[0]}."
            )
        mask = kwargs.pop(layout.mask_argument, None)
        cache = kwargs.pop("cache", kwargs.pop("past_key_values", None))
        position_bias = kwargs.pop("position_bias", None)
        task = self.task
        instruction = task.instruction_kv.get(module)
        dtype, device = key_value_states.dtype, key_value_states.device
        if instruction is None or instruction.key.dtype != dtype or instruction.key.device != device:
            states = task.states.to(device=device, dtype=dtype)
            instruction = project_instruction(module, layout, states, task.states_mask.to(device))
            task.instruction_kv[module] = instruction
        output, weights = shared_prefix_cross_attention(
            module, layout, instruction, rows, hidden_states, key_value_states, mask, cache, **kwargs
        )
        # T5's cross-attention has no relative position bias (checked when installed): pass on what came in.
        return (output, position_bias, weights) if layout.returns_position_bias else (output, weights)
