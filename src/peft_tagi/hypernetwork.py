"""`TagiHypernetwork`: encoded instruction -> one LoRA pair (A, B) for every targeted module."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TargetSpec:
    """A targeted linear layer: its path in the base model and its shape."""

    name: str
    in_features: int
    out_features: int

    @property
    def head_key(self) -> str:
        # Modules of one kind and shape (e.g. every T5 `q`) share output heads; the module embedding tells them apart.
        kind = self.name.rsplit(".", 1)[-1]
        return f"{kind}_{self.in_features}x{self.out_features}"


class TagiHypernetwork(nn.Module):
    """Instruction states -> LoRA weights for every target module.

    Pipeline: masked pooling of the instruction states into a task vector (padding never counts), LayerNorm and a
    projection, concatenation with a learned per-module embedding (layer and module identity), a shared two-layer
    ReLU trunk (a LayerNorm on its output with `normalized_heads`), then linear heads per module kind and shape that
    emit A and B.

    The B heads start at exactly zero, so a fresh hypernetwork writes ΔW = B·A = 0 and the adapted model equals the
    base model (LoRA's own initialisation argument). The A heads start with a bias drawn like LoRA's A
    (kaiming-uniform) so that gradients reach B from the first step. With `normalized_heads` the trunk's features are
    layer-normalised and the heads' outputs multiplied by 1 / hidden_size (see `__init__`), which keeps the generated
    weights at a LoRA's scale in training.

    With a separate instruction encoder (`TagiConfig.instruction_encoder`), `d_model` is the encoder's width and
    `fusion_dim` the base model's: `fusion_states` projects the encoder's token states for instruction fusion.
    """

    # Where a token sits in its instruction, for the position biases of several pooling queries: eight equal parts.
    POSITION_BUCKETS = 8

    def __init__(
        self,
        d_model: int,
        targets: list[TargetSpec],
        r: int,
        hidden_size: int,
        module_embedding_dim: int,
        pooling: str,
        pooling_queries: int = 1,
        normalized_heads: bool = True,
        fusion_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.targets = list(targets)
        self.r = r
        # Each head writes thousands of numbers from one `hidden_size` feature vector h. An Adam step moves every
        # head weight by about the learning rate, so it moves each generated entry by up to lr · ‖h‖₁: with raw ReLU
        # features (which grow under Adam too) hundreds of times the step of a LoRA trained directly. Measured on the
        # quickstart: max |ΔW| 200 after 50 distillation steps, 20,000 after 65, then an infinite gradient norm (one
        # seed in three diverged). `normalized_heads` bounds that step to about the learning rate, as for a LoRA:
        # a LayerNorm keeps h at unit scale and the heads' outputs are multiplied by 1 / hidden_size (their weights
        # start hidden_size times larger, so a fresh hypernetwork is unchanged). Either alone was not enough.
        self.head_scale = 1.0 / hidden_size if normalized_heads else 1.0
        self.pooling = pooling
        self.pooling_queries = pooling_queries
        if pooling == "attention":
            # Zero queries: uniform attention over real tokens, i.e. the masked mean, at initialisation. Several
            # queries start alike and part ways because the projection reads each one's output with its own weights.
            self.pool_query = nn.Parameter(
                torch.zeros(d_model) if pooling_queries == 1 else torch.zeros(pooling_queries, d_model)
            )
            if pooling_queries > 1:
                # Each query's learned bias for where in the instruction a token sits (its rank among the real tokens,
                # in POSITION_BUCKETS equal parts): contextual states carry position only faintly (T5's relative
                # attention none at all), and step order is where the steps are written.
                self.pool_position_bias = nn.Parameter(torch.zeros(pooling_queries, self.POSITION_BUCKETS))
        self.input_norm = nn.LayerNorm(d_model)
        self.input_proj = nn.Linear(pooling_queries * d_model, hidden_size)
        self.module_embedding = nn.Embedding(len(self.targets), module_embedding_dim)
        self.trunk = nn.Sequential(
            nn.Linear(hidden_size + module_embedding_dim, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
        )
        if normalized_heads:
            self.trunk.append(nn.LayerNorm(hidden_size))
        self.heads_A = nn.ModuleDict()
        self.heads_B = nn.ModuleDict()
        for spec in self.targets:
            if spec.head_key in self.heads_A:
                continue
            head_A = nn.Linear(hidden_size, r * spec.in_features)
            bound = 1.0 / math.sqrt(spec.in_features) / self.head_scale
            nn.init.uniform_(head_A.bias, -bound, bound)
            nn.init.normal_(head_A.weight, std=bound / math.sqrt(hidden_size))
            head_B = nn.Linear(hidden_size, spec.out_features * r)
            nn.init.zeros_(head_B.weight)
            nn.init.zeros_(head_B.bias)
            self.heads_A[spec.head_key] = head_A
            self.heads_B[spec.head_key] = head_B
        self._groups: dict[str, list[int]] = {}
        for i, spec in enumerate(self.targets):
            self._groups.setdefault(spec.head_key, []).append(i)
        if fusion_dim is not None:
            # A separate instruction encoder's states (d) become states of the base model's width for the decoder's
            # cross-attention, normalised as a base encoder's last layer leaves its states.
            self.fusion_projection = nn.Sequential(nn.Linear(d_model, fusion_dim), nn.LayerNorm(fusion_dim))

    def fusion_states(self, states: torch.Tensor) -> torch.Tensor:
        """Instruction states (T, S, d) as the decoder reads them with fusion: (T, S, fusion_dim) through the learned
        projection when the instruction encoder is not the base model's, else `states` unchanged."""
        if not hasattr(self, "fusion_projection"):
            return states
        with torch.autocast(states.device.type, enabled=False):
            return self.fusion_projection(states.to(self.input_proj.weight.dtype))

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states: (T, S, d), mask: (T, S) -> pooled states (T, Q, d), one per query (Q = `pooling_queries`; 1 for
        the mean). Padding positions get zero weight."""
        mask = mask.to(states.dtype)
        if self.pooling == "attention":
            queries = self.pool_query.to(states.dtype).reshape(self.pooling_queries, -1)  # (Q, d)
            scores = torch.einsum("tsd,qd->tqs", states, queries) / math.sqrt(states.shape[-1])
            if self.pooling_queries > 1:
                rank = (mask.cumsum(-1) - 1).clamp_min(0)  # (T, S): the token's index among the real tokens
                length = mask.sum(-1, keepdim=True).clamp_min(1)
                bucket = (rank * self.POSITION_BUCKETS / length).long().clamp_max(self.POSITION_BUCKETS - 1)
                scores = scores + self.pool_position_bias.to(states.dtype)[:, bucket].permute(1, 0, 2)
            scores = scores.masked_fill(mask[:, None] == 0, torch.finfo(states.dtype).min)
            weights = torch.softmax(scores, dim=-1) * mask[:, None]
        else:
            weights = mask[:, None]
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        return torch.einsum("tqs,tsd->tqd", weights, states)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """states: (T, S, d), mask: (T, S) -> {module name: (A (T, r, in), B (T, out, r))}.

        The states come in the base model's dtype (e.g. bfloat16) and are cast to the hypernetwork's (float32 unless
        the whole model was cast), and autocast is off inside, so the weights are generated at the hypernetwork's
        precision also under `bf16=True` training.
        """
        with torch.autocast(states.device.type, enabled=False):
            return self._generate(states.to(self.input_proj.weight.dtype), mask)

    def _generate(self, states: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        task = self.input_proj(self.input_norm(self.pool(states, mask)).flatten(1))  # (T, H)
        n_tasks, n_modules = task.shape[0], len(self.targets)
        emb = self.module_embedding.weight.to(task.dtype)  # (M, E)
        features = torch.cat(
            [task[:, None, :].expand(n_tasks, n_modules, -1), emb[None].expand(n_tasks, -1, -1)], dim=-1
        )
        features = self.trunk(features)  # (T, M, H)
        weights = {}
        for key, indices in self._groups.items():
            group = features[:, indices]  # (T, m, H)
            flat_A = self.heads_A[key](group) * self.head_scale
            flat_B = self.heads_B[key](group) * self.head_scale
            for j, i in enumerate(indices):
                spec = self.targets[i]
                lora_A = flat_A[:, j].reshape(n_tasks, self.r, spec.in_features)
                lora_B = flat_B[:, j].reshape(n_tasks, spec.out_features, self.r)
                weights[spec.name] = (lora_A, lora_B)
        return weights
