"""Gradient checkpointing of layers whose LoRA weights are installed for one forward call only.

TAGI installs each forward's generated weights in its `TagiLinear` layers for the duration of that call. A
checkpointed transformers layer (`GradientCheckpointingLayer` and the like) runs its forward a second time during
backward, when those weights are gone, and in reentrant mode it differentiates only with respect to the tensors passed
to the checkpoint function. `TaskWeightsCheckpoint` wraps a module's `_gradient_checkpointing_func` so that:

- the task weights installed at the original call are re-installed for the recomputation (the same tensors, so the
  recomputed forward equals the original one; non-reentrant checkpointing checks that);
- those weights are passed to the checkpoint function as explicit inputs, so reentrant checkpointing returns their
  gradients to the hypernetwork (or teacher bank) through the outer graph, once per layer, instead of dropping them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from torch import nn

from .layer import TagiLinear


class TaskWeightsCheckpoint:
    """A module's checkpoint function, made aware of the task weights of the `TagiLinear` layers inside the module.

    Args:
        checkpoint_fn: the function transformers installed (`partial(torch.utils.checkpoint.checkpoint, ...)`), called
            as `checkpoint_fn(function, *args)`.
        layers: the `TagiLinear` layers that the checkpointed module contains.
    """

    def __init__(self, checkpoint_fn: Callable, layers: list[TagiLinear]) -> None:
        self.checkpoint_fn = checkpoint_fn
        self.layers = layers

    def __call__(self, function: Callable, *args, **kwargs):
        installed = [(layer, layer.task_weights) for layer in self.layers if layer.task_weights[0] is not None]
        if not installed:
            return self.checkpoint_fn(function, *args, **kwargs)
        # (A, B) of every installed layer, flattened, as extra inputs of the checkpointed function.
        tensors = [t for _, (lora_A, lora_B, _) in installed for t in (lora_A, lora_B)]
        n_args = len(args)

        def run(*inputs):
            weights = inputs[n_args:]
            state = [
                (layer, (weights[2 * i], weights[2 * i + 1], row_index))
                for i, (layer, (_, _, row_index)) in enumerate(installed)
            ]
            with _installed(state):
                return function(*inputs[:n_args])

        return self.checkpoint_fn(run, *args, *tensors, **kwargs)


@contextmanager
def _installed(state: list[tuple[TagiLinear, tuple]]):
    previous = [(layer, layer.task_weights) for layer, _ in state]
    for layer, weights in state:
        layer.set_task_weights(*weights)
    try:
        yield
    finally:
        for layer, weights in previous:
            layer.set_task_weights(*weights)


def checkpointable_modules(model: nn.Module) -> list[tuple[nn.Module, list[TagiLinear]]]:
    """The modules transformers may checkpoint (those with a `gradient_checkpointing` flag), each with its TAGI layers."""
    return [
        (module, [m for m in module.modules() if isinstance(m, TagiLinear)])
        for module in model.modules()
        if hasattr(module, "gradient_checkpointing")
    ]


def wrap_checkpoint_functions(modules: list[tuple[nn.Module, list[TagiLinear]]]) -> None:
    """Wrap each module's `_gradient_checkpointing_func` (set by `gradient_checkpointing_enable`) once.

    Called before each forward with gradients: transformers installs a new function every time checkpointing is
    enabled, which may happen before or after `get_peft_model`.
    """
    for module, layers in modules:
        checkpoint_fn = getattr(module, "_gradient_checkpointing_func", None)
        if checkpoint_fn is not None and not isinstance(checkpoint_fn, TaskWeightsCheckpoint):
            module._gradient_checkpointing_func = TaskWeightsCheckpoint(checkpoint_fn, layers)
