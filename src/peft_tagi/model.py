"""`TagiModel`: the PEFT tuner that injects `TagiLinear` layers, encodes instructions and drives the hypernetwork."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TaskType
from torch import nn
from transformers.utils import logging

from .adapter import TaskAdapter
from .checkpointing import checkpointable_modules, wrap_checkpoint_functions
from .config import TAGI_TARGET_MODULES_MAPPING, TagiConfig
from .fusion import InstructionFusion
from .hypernetwork import TagiHypernetwork, TargetSpec
from .instruction_encoder import InstructionEncoder
from .layer import TagiLinear, TaskWeights, dispatch_default

logger = logging.get_logger(__name__)


@dataclass
class EncodedInstructions:
    """Unique instructions of a batch after encoding.

    Shapes: input_ids (T, S), attention_mask (T, S), states (T, S, d_model), row_index (batch,) with the unique
    instruction of every batch row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    states: torch.Tensor
    row_index: torch.Tensor


class TagiModel(BaseTuner):
    """Creates a TAGI model from a pretrained transformers model (use `peft.get_peft_model` with a `TagiConfig`).

    Extra inputs of `forward` / `generate`: `instruction_input_ids` (batch, S) and `instruction_attention_mask`
    (batch, S), one instruction per row. The instructions are encoded by the base model with the adapters off;
    identical instructions are encoded and turned into weights once. Without instruction ids, a `TaskAdapter`
    installed with `use_adapter` is applied.
    """

    prefix: str = "tagi_"
    tuner_layer_cls = TagiLinear
    target_module_mapping = TAGI_TARGET_MODULES_MAPPING
    uses_shared_state = True

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        if "tagi_hypernetwork" in self._modules:
            raise ValueError(
                "A TAGI model holds one hypernetwork; adding a second adapter is not supported. "
                "Create a separate model with get_peft_model for another TagiConfig."
            )
        super().inject_adapter(model, adapter_name, **kwargs)

    def _pre_injection_hook(self, model: nn.Module, config: TagiConfig, adapter_name: str) -> None:
        is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        if config.task_type == TaskType.SEQ_2_SEQ_LM and not is_encoder_decoder:
            raise ValueError(
                f"task_type='SEQ_2_SEQ_LM' needs an encoder-decoder model, but {type(model).__name__} is decoder-only. "
                "Use TagiConfig(task_type='CAUSAL_LM', instruction_fusion=False)."
            )
        if config.task_type == TaskType.CAUSAL_LM and is_encoder_decoder:
            raise ValueError(
                f"task_type='CAUSAL_LM' does not fit the encoder-decoder model {type(model).__name__}. "
                "Use TagiConfig(task_type='SEQ_2_SEQ_LM')."
            )
        self._active: TaskWeights | None = None
        self._adapters_enabled = True
        self.last_task_weights: TaskWeights | None = None
        # With instruction fusion: the decoder's cross-attention over [instruction ; input] (fusion.py).
        self.fusion: InstructionFusion | None = None
        # With TagiConfig.instruction_encoder: the frozen encoder that reads the instructions (not a submodule: its
        # weights are not trained and not saved with the checkpoint).
        self.instruction_encoder: InstructionEncoder | None = None
        self._layers: dict[str, TagiLinear] = {}
        self._checkpointable: list[tuple[nn.Module, list[TagiLinear]]] = []

    @staticmethod
    def _prepare_adapter_config(peft_config: TagiConfig, model_config: dict) -> TagiConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in TAGI_TARGET_MODULES_MAPPING:
                raise ValueError(
                    f"TagiConfig.target_modules has no default for model_type={model_type!r} (known: "
                    f"{sorted(TAGI_TARGET_MODULES_MAPPING)}); set target_modules, e.g. ['q_proj', 'v_proj']."
                )
            peft_config.target_modules = list(TAGI_TARGET_MODULES_MAPPING[model_type])
        return peft_config

    def _create_and_replace(
        self,
        peft_config: TagiConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("TAGI targets modules, not parameters: leave target_parameters unset.")
        new_module = self._create_new_module(peft_config, adapter_name, target)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(peft_config: TagiConfig, adapter_name: str, target: nn.Module) -> TagiLinear:
        # Each dispatcher returns a layer for the targets it knows, or None. The first match wins, so the backends
        # whose layers subclass nn.Linear (bitsandbytes) come before the plain default.
        dispatchers = []
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if type(base_layer).__module__.startswith("bitsandbytes."):
            # Only a quantized base brings bitsandbytes layers; importing it for any other model costs a second.
            from .bnb import dispatch_bnb_4bit, dispatch_bnb_8bit

            dispatchers += [dispatch_bnb_8bit, dispatch_bnb_4bit]
        dispatchers.append(dispatch_default)
        for dispatcher in dispatchers:
            new_module = dispatcher(target, adapter_name, config=peft_config)
            if new_module is not None:
                return new_module
        raise ValueError(
            f"TAGI cannot target {type(target).__name__}: it supports torch.nn.Linear, transformers Conv1D and "
            "bitsandbytes Linear8bitLt / Linear4bit layers. Choose other target_modules in TagiConfig."
        )

    def _post_injection_hook(self, model: nn.Module, config: TagiConfig, adapter_name: str) -> None:
        self._layers = {name: m for name, m in model.named_modules() if isinstance(m, TagiLinear)}
        self._checkpointable = checkpointable_modules(model)
        embeddings = model.get_input_embeddings()
        instruction_dim, fusion_dim = embeddings.embedding_dim, None
        if config.instruction_encoder is not None:
            # Loaded (and checked) before the hypernetwork, whose input width is the encoder's; the fingerprint of a
            # new model's encoder goes into its config, so that loading the checkpoint checks it.
            def record(found: str) -> None:
                config.instruction_encoder_fingerprint = found

            self.instruction_encoder = InstructionEncoder(
                config.instruction_encoder, config.instruction_encoder_fingerprint, on_load=record
            )
            if nn.Linear(1, 1).weight.device.type != "meta":
                # Under peft's low_cpu_mem_usage every new parameter lands on the meta device, so the weights load at
                # the first instruction encoded instead.
                self.instruction_encoder.load(embeddings.weight.device)
            instruction_dim = self.instruction_encoder.hidden_size
            fusion_dim = embeddings.embedding_dim if config.instruction_fusion else None
        # Built in place on the base model's device (not moved there): under peft's low_cpu_mem_usage the parameters
        # are created on the meta device and a copy would fail; the checkpoint's tensors are assigned later. The
        # hypernetwork stays in float32 whatever the base dtype (see TagiConfig).
        with torch.device(embeddings.weight.device):
            hypernetwork = TagiHypernetwork(
                d_model=instruction_dim,
                targets=self.target_specs,
                r=config.r,
                hidden_size=config.hypernetwork_hidden_size,
                module_embedding_dim=config.module_embedding_dim,
                pooling=config.pooling,
                pooling_queries=config.pooling_queries,
                normalized_heads=config.normalized_heads,
                fusion_dim=fusion_dim,
            )
        # peft's contract: nothing is trainable in inference mode (also PeftModel.from_pretrained(is_trainable=False)).
        hypernetwork.requires_grad_(not config.inference_mode)
        self.tagi_hypernetwork = nn.ModuleDict({adapter_name: hypernetwork})
        if config.instruction_fusion:
            self.fusion = InstructionFusion(model)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # peft's per-key hook (used both ways, saving and loading). Model-level containers (`tagi_hypernetwork`, and
        # whatever else is attached under the method's prefix, such as a trainer's teacher bank) are ModuleDicts keyed
        # by adapter name; checkpoints store them without it.
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.startswith(cls.prefix) and parts[i + 1] == adapter_name:
                return ".".join(parts[: i + 1] + parts[i + 2 :])
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # ------------------------------------------------------------------ properties
    @property
    def tagi_config(self) -> TagiConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def tagi_layers(self) -> dict[str, TagiLinear]:
        """The TAGI layers by module path in the base model, in the order of the hypernetwork's module embeddings."""
        return dict(self._layers)

    @property
    def hypernetwork(self) -> TagiHypernetwork:
        return self.tagi_hypernetwork[self.active_adapters[0]]

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._adapters_enabled = enabled
        if self.fusion is not None:
            self.fusion.enabled = enabled

    # ------------------------------------------------------------------ instruction encoding
    def _prepare_instruction_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate, truncate and trim: returns ids and mask (batch, S) with no all-padding column."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                "instruction_input_ids must be a 2-D tensor (batch, length) of token ids; "
                f"got {type(input_ids).__name__} with shape {getattr(input_ids, 'shape', None)}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"instruction_attention_mask {tuple(attention_mask.shape)} must have the shape of "
                f"instruction_input_ids {tuple(input_ids.shape)}."
            )
        attention_mask = attention_mask.to(input_ids.device).long()
        lengths = attention_mask.sum(dim=1)
        empty = (lengths == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"Instruction rows {empty} are empty (no token in the attention mask): every input needs a "
                "non-empty task instruction."
            )
        limit = self.tagi_config.max_instruction_length
        message = f"more than max_instruction_length={limit}. Shorten it or raise TagiConfig.max_instruction_length"
        # Learned absolute positions (BART, BERT, GPT-2, ...) end somewhere: past them the encoder would fail.
        reader = self.model.config if self.instruction_encoder is None else self.instruction_encoder.config
        positions = getattr(reader, "max_position_embeddings", None)
        if positions is not None and positions < limit:
            limit, message = positions, f"more than the {positions} positions of the model that reads it. Shorten it"
        message = f"An instruction has {int(lengths.max())} tokens, {message}"
        if int(lengths.max()) > limit:
            if self.tagi_config.instruction_overflow == "error":
                raise ValueError(message + ".")
            logger.warning(message + f"; keeping the first {limit} tokens.")
            attention_mask = attention_mask * (attention_mask.cumsum(dim=1) <= limit).long()
        keep = attention_mask.bool().any(dim=0)
        return input_ids[:, keep], attention_mask[:, keep]

    @contextmanager
    def _base_model_only(self) -> Iterator[None]:
        """Run the untouched base model: every TAGI layer bypassed, whatever is installed."""
        previous = {name: layer._disable_adapters for name, layer in self._layers.items()}
        for layer in self._layers.values():
            layer._disable_adapters = True
        try:
            yield
        finally:
            for name, layer in self._layers.items():
                layer._disable_adapters = previous[name]

    @property
    def instruction_tokenizer(self):
        """The tokenizer of `instruction_input_ids`: the instruction encoder's, or None for the base model's own."""
        return None if self.instruction_encoder is None else self.instruction_encoder.tokenizer

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """States of instructions (T, S) -> (T, S, d), no gradient: the instruction encoder's (d its width) when
        there is one, else the base model's (d = d_model) with the adapters off."""
        if self.instruction_encoder is not None:
            return self.instruction_encoder(input_ids, attention_mask)
        with torch.no_grad(), self._base_model_only():
            if self.model.config.is_encoder_decoder:
                out = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            else:
                backbone = getattr(self.model, self.model.base_model_prefix)
                out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return out.last_hidden_state

    def encode_instructions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> EncodedInstructions:
        """Deduplicate and encode a batch of instructions (batch, S); each unique instruction is encoded once."""
        input_ids, attention_mask = self._prepare_instruction_batch(input_ids, attention_mask)
        key = torch.cat([input_ids * attention_mask, attention_mask], dim=1)
        unique, row_index = torch.unique(key, dim=0, return_inverse=True)
        width = input_ids.shape[1]
        unique_ids, unique_mask = unique[:, :width], unique[:, width:]
        keep = unique_mask.bool().any(dim=0)
        unique_ids, unique_mask = unique_ids[:, keep], unique_mask[:, keep]
        states = self._encode(unique_ids, unique_mask)
        return EncodedInstructions(unique_ids, unique_mask, states, row_index)

    # ------------------------------------------------------------------ installing task weights
    def _install(self, active: TaskWeights | None) -> None:
        if self.fusion is not None:
            self.fusion.task = active
        for name, layer in self._layers.items():
            if active is None:
                layer.set_task_weights(None, None)
            else:
                layer.set_task_weights(*active.weights[name], active.row_index)
        self._active = active

    def task_weights_from_instructions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> TaskWeights:
        """Encode instructions (batch, S) and generate their LoRA weights, with gradients to the hypernetwork."""
        encoded = self.encode_instructions(input_ids, attention_mask)
        weights = self.hypernetwork(encoded.states, encoded.attention_mask)
        _check_finite(weights)
        fusion = self.tagi_config.instruction_fusion
        return TaskWeights(
            weights=weights,
            row_index=encoded.row_index,
            states=self.hypernetwork.fusion_states(encoded.states) if fusion else None,
            states_mask=encoded.attention_mask if fusion else None,
        )

    def task_weights_from_adapter(self, adapter: TaskAdapter, fusion: bool | None = None) -> TaskWeights:
        """The weights of a `TaskAdapter` (or any LoRA of the same targets) for every row of a batch.

        `fusion=None` follows the config; `fusion=False` applies the LoRA alone (e.g. a teacher that reads the
        instruction in its input), with no instruction states for the decoder.
        """
        names, expected = set(adapter.lora_A), set(self._layers)
        if names != expected:
            raise ValueError(
                f"The TaskAdapter targets other modules than this model (missing: {sorted(expected - names)[:4]}, "
                f"unexpected: {sorted(names - expected)[:4]}): it was made for another base model or TagiConfig."
            )
        ratio = adapter.scaling / self.tagi_config.scaling
        device = self.model.get_input_embeddings().weight.device
        weights = {}
        for name, layer in self._layers.items():
            lora_A, lora_B = adapter.lora_A[name], adapter.lora_B[name]
            if lora_A.shape != (layer.r, layer.in_features) or lora_B.shape != (layer.out_features, layer.r):
                raise ValueError(
                    f"TaskAdapter weights for {name} have shapes A{tuple(lora_A.shape)}, B{tuple(lora_B.shape)} but "
                    f"the model expects A({layer.r}, {layer.in_features}), B({layer.out_features}, {layer.r}): it "
                    "was made for a base model of other shapes or another rank."
                )
            weights[name] = (lora_A.to(device)[None], (lora_B.to(device) * ratio)[None])
        _check_finite(weights)
        states = mask = None
        if self.tagi_config.instruction_fusion and fusion is not False:
            if adapter.instruction_states is None:
                raise ValueError(
                    "This model uses instruction fusion but the TaskAdapter has no instruction states (it was "
                    "exported without fusion or loaded from a plain LoRA folder). Load it with TaskAdapter.load from "
                    "a folder written by save_lora, or use a model with instruction_fusion=False."
                )
            states = adapter.instruction_states.to(device)[None]
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=device)
        return TaskWeights(weights=weights, row_index=None, states=states, states_mask=mask)

    def task_weights_from_adapters(self, adapters: Sequence[TaskAdapter], row_index: torch.Tensor) -> TaskWeights:
        """Several `TaskAdapter`s in one batch: row `i` gets `adapters[row_index[i]]` (a mixed-task batch).

        Each adapter's weights are those `task_weights_from_adapter` gives it alone, stacked: A (T, r, in), B (T, out,
        r); with instruction fusion their instruction states are padded to the longest, states (T, S, d_model) with
        states_mask (T, S). `row_index` (batch,) holds indices into `adapters`.
        """
        single = [self.task_weights_from_adapter(adapter) for adapter in adapters]
        weights = {
            name: (torch.cat([w.weights[name][0] for w in single]), torch.cat([w.weights[name][1] for w in single]))
            for name in single[0].weights
        }
        states = mask = None
        if single[0].states is not None:
            longest = max(w.states.shape[1] for w in single)
            states = single[0].states.new_zeros(len(single), longest, single[0].states.shape[2])
            mask = torch.zeros(len(single), longest, dtype=torch.long, device=states.device)
            for i, w in enumerate(single):
                states[i, : w.states.shape[1]] = w.states[0]
                mask[i, : w.states.shape[1]] = 1
        device = next(iter(weights.values()))[0].device
        return TaskWeights(weights=weights, row_index=row_index.to(device), states=states, states_mask=mask)

    @contextmanager
    def _task_context(
        self,
        instruction_input_ids: torch.Tensor | None,
        instruction_attention_mask: torch.Tensor | None,
        batch_size: int | None,
    ) -> Iterator[None]:
        if not self._adapters_enabled:
            yield  # inside disable_adapter(): the plain base model, instructions ignored
            return
        if not self.peft_config:
            if instruction_input_ids is not None:
                raise ValueError(
                    "This model's TAGI adapter was deleted (delete_adapter), so it cannot read instructions; load a "
                    "TAGI checkpoint with PeftModel.from_pretrained, or drop instruction_input_ids to run the base model."
                )
            yield
            return
        if instruction_input_ids is None:
            if self._active is None:
                raise ValueError(
                    "No instruction_input_ids and no active TaskAdapter: pass instruction_input_ids= and "
                    "instruction_attention_mask= (the tokenized task instruction), or wrap the call in "
                    "`with model.use_adapter(task_adapter):`."
                )
            yield
            return
        if (
            batch_size is not None
            and instruction_input_ids.dim() >= 1
            and instruction_input_ids.shape[0] != batch_size
        ):
            raise ValueError(
                f"The batch has {batch_size} inputs but {instruction_input_ids.shape[0]} instructions: pass exactly "
                "one instruction row per input row (repeat the instruction for inputs of the same task)."
            )
        task_weights = self.task_weights_from_instructions(instruction_input_ids, instruction_attention_mask)
        # Kept for losses on the generated weights (TagiTrainer's ΔW alignment) after the forward pass.
        self.last_task_weights = task_weights
        with self.apply_task_weights(task_weights):
            yield

    @contextmanager
    def apply_task_weights(self, task_weights: TaskWeights) -> Iterator[TaskWeights]:
        """Apply `task_weights` to every call inside the block, then restore what was applied before."""
        previous = self._active
        self._install(task_weights)
        try:
            yield task_weights
        finally:
            if any(layer.merged for layer in self._layers.values()):
                # merge_and_unload() inside the block: the weights now live in the base model.
                self._active = previous
            else:
                self._install(previous)

    # ------------------------------------------------------------------ public API
    def forward(
        self,
        *args,
        instruction_input_ids: torch.Tensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        if torch.is_grad_enabled():
            wrap_checkpoint_functions(self._checkpointable)
        with self._task_context(instruction_input_ids, instruction_attention_mask, _batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    def generate(
        self,
        *args,
        instruction_input_ids: torch.Tensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        with self._task_context(instruction_input_ids, instruction_attention_mask, _batch_size(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    @torch.no_grad()
    def generate_adapter(
        self,
        instruction_input_ids: torch.Tensor,
        instruction_attention_mask: torch.Tensor | None = None,
        instructions: list[str] | None = None,
    ) -> list[TaskAdapter]:
        """Generate one `TaskAdapter` per instruction row (identical rows share one adapter object).

        Each unique instruction is encoded and generated on its own, at its own length, so an adapter is bitwise the
        same whatever batch it came in.
        """
        input_ids, attention_mask = self._prepare_instruction_batch(instruction_input_ids, instruction_attention_mask)
        if instructions is not None and len(instructions) != input_ids.shape[0]:
            raise ValueError(f"Got {len(instructions)} instruction texts for {input_ids.shape[0]} rows.")
        config = self.tagi_config
        cache: dict[tuple[int, ...], TaskAdapter] = {}
        adapters = []
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][attention_mask[row].bool()][None]
            key = tuple(ids[0].tolist())
            if key not in cache:
                mask = torch.ones_like(ids)
                states = self._encode(ids, mask)
                weights = self.hypernetwork(states, mask)
                _check_finite(weights)
                cache[key] = self.new_task_adapter(
                    lora_A={name: a[0].detach().clone() for name, (a, _) in weights.items()},
                    lora_B={name: b[0].detach().clone() for name, (_, b) in weights.items()},
                    instruction_states=(
                        self.hypernetwork.fusion_states(states)[0].detach().clone()
                        if config.instruction_fusion
                        else None
                    ),
                    instruction=None if instructions is None else instructions[row],
                )
            adapters.append(cache[key])
        return adapters

    def new_task_adapter(
        self,
        lora_A: dict[str, torch.Tensor],
        lora_B: dict[str, torch.Tensor],
        instruction_states: torch.Tensor | None = None,
        instruction: str | None = None,
    ) -> TaskAdapter:
        """A `TaskAdapter` for this model's targets, rank, alpha and task type (A: (r, in), B: (out, r) per module)."""
        config = self.tagi_config
        task_type = config.task_type
        return TaskAdapter(
            lora_A=lora_A,
            lora_B=lora_B,
            r=config.r,
            lora_alpha=config.lora_alpha,
            task_type=str(getattr(task_type, "value", task_type)),
            fan_in_fan_out=any(layer.fan_in_fan_out for layer in self._layers.values()),
            instruction_states=instruction_states,
            instruction=instruction,
            base_model_name_or_path=getattr(self.model, "name_or_path", None) or config.base_model_name_or_path,
            instruction_encoder=config.instruction_encoder,
        )

    @property
    def target_specs(self) -> list[TargetSpec]:
        """The targeted layers, in the order of the hypernetwork's module embeddings."""
        return [TargetSpec(name, m.in_features, m.out_features) for name, m in self._layers.items()]

    @contextmanager
    def use_adapter(self, adapter: TaskAdapter, merge: bool = False) -> Iterator[TaskAdapter]:
        """Apply a cached `TaskAdapter` to every call inside the block; no instruction ids are needed there.

        Open the block once around many batches: with instruction fusion, each cross-attention layer projects the
        task's instruction once for the whole block.

        Args:
            adapter (`TaskAdapter`): the task's adapter (from `generate_adapter` or `TaskAdapter.load`).
            merge (`bool`): merge the LoRA into the base weights for the block, so that each targeted layer costs
                what the base layer costs (single-task serving at the speed of the base model). On exit the base
                weights are restored exactly (the original tensors are put back, nothing is subtracted). Quantized
                (bitsandbytes) layers re-quantize on merge and on restore, so they round twice; leave `merge=False`
                for them when exact outputs matter.
        """
        if not isinstance(adapter, TaskAdapter):
            raise TypeError(f"use_adapter expects a TaskAdapter, got {type(adapter).__name__}.")
        with self.apply_task_weights(self.task_weights_from_adapter(adapter)):
            if not merge:
                yield adapter
                return
            if any(layer.merged for layer in self._layers.values()):
                raise ValueError(
                    "use_adapter(merge=True) found layers already merged: call unmerge_adapter() first, or use "
                    "merge=False."
                )
            merged = []
            try:
                for layer in self._layers.values():
                    layer.merge()
                    merged.append(layer)
                yield adapter
            finally:
                # After merge_and_unload() inside the block the layers are gone and the merge belongs to the caller.
                current = set(map(id, self._layers.values()))
                for layer in merged:
                    if id(layer) in current:
                        layer.unmerge()

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete the TAGI adapter: every TAGI layer gives back its base layer and the hypernetwork is dropped.

        A TAGI model holds one adapter, so this is `unload()` plus forgetting the config; the base model is restored
        exactly. Afterwards the model runs the plain base model and refuses instruction inputs.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; this model has {list(self.peft_config)}.")
        if any(layer.merged for layer in self._layers.values()):
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into the base weights: call unmerge_adapter() before deleting it, "
                "or merge_and_unload() to keep the merged model."
            )
        self._unload_and_optionally_merge(merge=False)
        del self.peft_config[adapter_name]
        for name, container in self._modules.items():
            if name.startswith(self.prefix) and isinstance(container, nn.ModuleDict) and adapter_name in container:
                del container[adapter_name]
        self._checkpointable = []
        self.active_adapter = []

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            if self._active is None or self._active.row_index is not None:
                raise ValueError(
                    "merge_and_unload() merges one task's generated LoRA: call it inside "
                    "`with model.use_adapter(task_adapter):`."
                )
            if self._active.states is not None:
                warnings.warn(
                    "The merged model has no instruction fusion: the decoder no longer sees the instruction, so its "
                    "outputs differ from the TAGI model's. Train with instruction_fusion=False for a mergeable "
                    "adapter.",
                    stacklevel=3,
                )
        if self.fusion is not None:
            self.fusion.remove()
            self.fusion = None
        self.instruction_encoder = None
        model = super()._unload_and_optionally_merge(merge=merge, **kwargs)
        for layer in self._layers.values():
            layer.set_task_weights(None, None)
        self._layers = {}
        return model


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def _check_finite(weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    # One device sync per call (this runs on every training forward), the per-module search only on failure.
    finite = torch.stack([torch.isfinite(a).all() & torch.isfinite(b).all() for a, b in weights.values()])
    if bool(finite.all()):
        return
    name = list(weights)[int((~finite).nonzero()[0])]
    raise ValueError(
        f"The generated LoRA weights for {name} contain NaN or inf: the hypernetwork diverged or was loaded "
        "from a damaged checkpoint. Lower the learning rate or reload a good checkpoint."
    )
