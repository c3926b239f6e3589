"""Serving: instruction keys / values projected once per task, and `use_adapter(merge=True)`.

The shared route (no gradients) must give what the concatenated route gives: the reference is the same model with
`_shares_instruction_kv` switched off, which makes every row project [instruction ; input] as before.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import BUILDERS, SEQ2SEQ, make_batch, randomize_hypernetwork, task_type
from peft import get_peft_model

from peft_tagi import TagiConfig, TagiLinear


def tagi(family: str, **config):
    config = {"r": 4, "lora_alpha": 8, "hypernetwork_hidden_size": 32, "module_embedding_dim": 8, **config}
    model = get_peft_model(BUILDERS[family](), TagiConfig(task_type=task_type(family), **config))
    randomize_hypernetwork(model)
    return model


@contextmanager
def concatenated(model):
    """The reference route: every row projects [instruction ; input] (as with gradients)."""
    model.base_model._shares_instruction_kv = False
    try:
        yield
    finally:
        model.base_model._shares_instruction_kv = True


def kv_projections(model) -> list[torch.nn.Module]:
    names = ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj", "encoder_attn.v_proj")
    return [m for n, m in model.get_base_model().get_decoder().named_modules() if n.endswith(names)]


def _counting(forward, calls: list):
    """`forward`, recording the (rows, length) of every input."""

    def counted(x, *args, **kwargs):
        calls.append(tuple(x.shape[:2]))
        return forward(x, *args, **kwargs)

    return counted


GENERATE = [
    {"num_beams": 1},
    {"num_beams": 3},
    {"do_sample": True, "num_return_sequences": 2},  # sampling draws the same numbers on both routes (seeded)
    {"num_beams": 3, "num_return_sequences": 2},
]


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
@pytest.mark.parametrize("options", GENERATE, ids=["greedy", "beam", "sample_return_2", "beam_return_2"])
def test_shared_instruction_kv_equals_concatenation_in_generate(family, options):
    model = tagi(family)
    assert model.base_model._shares_instruction_kv and len(kv_projections(model)) == 4
    batch = make_batch(family, batch=4, seed=1)  # rows 0, 1, 2 differ in instruction: a mixed-task batch
    batch["instruction_input_ids"][3] = batch["instruction_input_ids"][0]
    batch["instruction_attention_mask"][3] = batch["instruction_attention_mask"][0]
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    common = dict(max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True, output_logits=True, **options)
    [adapter] = model.generate_adapter(kwargs["instruction_input_ids"][:1], kwargs["instruction_attention_mask"][:1])
    results = {}
    for route in ("shared", "concatenated"):
        context = concatenated(model) if route == "concatenated" else contextmanager(lambda: (yield))()
        with context:
            torch.manual_seed(0)
            mixed = model.generate(**kwargs, **common)
            torch.manual_seed(0)
            with model.base_model.use_adapter(adapter):
                single = model.generate(
                    input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"], **common
                )
        results[route] = (mixed, single)
    for shared, reference in zip(results["shared"], results["concatenated"]):
        assert shared.sequences.tolist() == reference.sequences.tolist()
        for step_shared, step_reference in zip(shared.logits, reference.logits):
            assert (step_shared - step_reference).abs().max() <= 1e-5
    # the instruction matters: the model without its adapter generates other logits
    torch.manual_seed(0)
    with model.disable_adapter():
        plain = model.generate(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"], **common)
    assert not torch.allclose(plain.logits[0], results["shared"][1].logits[0])


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_shared_route_equals_training_route_in_forward(family):
    model = tagi(family)
    batch = make_batch(family)
    with torch.no_grad():
        shared = model(**batch).logits
    with_grad = model(**batch)  # gradients on: the concatenated route, whose loss trains the hypernetwork
    with_grad.loss.backward()
    assert (shared - with_grad.logits.detach()).abs().max() <= 1e-5
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.base_model.tagi_hypernetwork.parameters())


def test_instruction_projected_once_per_task_for_all_rows_batches_and_steps():
    model = tagi("t5")
    batch = make_batch("t5", batch=6)
    ins_len = batch["instruction_input_ids"].shape[1]
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1], batch["instruction_attention_mask"][:1])
    calls = {}
    for module in kv_projections(model):
        # TagiLinear projects the instructions with forward_per_task (one row per task), plain layers with forward
        for method in ("forward", "forward_per_task") if isinstance(module, TagiLinear) else ("forward",):
            setattr(module, method, _counting(getattr(module, method), calls.setdefault(module, [])))
    with torch.no_grad(), model.base_model.use_adapter(adapter):
        for start in (0, 3):  # two batches of 3 rows, 5 decoding steps each, beam search
            rows = slice(start, start + 3)
            model.generate(input_ids=batch["input_ids"][rows], max_new_tokens=5, min_new_tokens=5, num_beams=2)
        cached = model.base_model._active.instruction_kv
    for module in kv_projections(model):
        instruction_calls = [shape for shape in calls[module] if shape[1] == ins_len]
        # one projection of the one task's instruction (1 row), whatever the rows, beams, batches and steps
        assert instruction_calls == [(1, ins_len)], calls[module]
        # the inputs are projected once per batch (then the cross-attention cache serves every step)
        assert [shape for shape in calls[module] if shape[1] != ins_len] == [(6, 7), (6, 7)]
        assert cached[module].shape[:2] == (1, ins_len)


def test_concatenated_states_built_once_per_generate_call():
    model = tagi("bart")
    batch = make_batch("bart")
    seen = []
    decoder = model.get_base_model().get_decoder()
    # registered after the fusion hook, so it sees the fused inputs
    handle = decoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True
    )
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        model.generate(**kwargs, max_new_tokens=4, min_new_tokens=4, num_beams=2)
        first = len(seen)
        model.generate(**kwargs, max_new_tokens=4, min_new_tokens=4, num_beams=2)
    handle.remove()
    assert first == 4 and len(seen) == 8
    assert all(s is seen[0] for s in seen[:4]) and all(s is seen[4] for s in seen[4:]) and seen[4] is not seen[0]
    assert model.base_model._fused_inputs is None  # freed when the call's task weights were removed


@pytest.mark.parametrize("fusion", [False, True])
def test_use_adapter_merge_restores_base_weights_exactly(fusion):
    model = tagi("t5", instruction_fusion=fusion)
    batch = make_batch("t5")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    layers = [m for m in model.modules() if isinstance(m, TagiLinear)]
    before = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1], batch["instruction_attention_mask"][:1])
    with torch.no_grad():
        with model.base_model.use_adapter(adapter):
            unmerged = model(**inputs).logits
        with model.base_model.use_adapter(adapter, merge=True):
            assert all(layer.merged for layer in layers)
            changed = [not torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(layers, before)]
            assert all(changed)
            merged = model(**inputs).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    assert not any(layer.merged for layer in layers)
    for layer, weight in zip(layers, before):
        assert torch.equal(layer.get_base_layer().weight, weight)
    with torch.no_grad(), model.disable_adapter():
        plain = model(**inputs).logits
    assert not torch.allclose(plain, merged)


def test_merge_and_unload_inside_a_merged_block_keeps_the_merge():
    model = tagi("t5", instruction_fusion=False)
    batch = make_batch("t5")
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1], batch["instruction_attention_mask"][:1])
    with torch.no_grad(), model.base_model.use_adapter(adapter):
        expected = model(input_ids=batch["input_ids"], labels=batch["labels"]).logits
    with torch.no_grad(), model.base_model.use_adapter(adapter, merge=True):
        plain = model.merge_and_unload()
    with torch.no_grad():
        assert (plain(input_ids=batch["input_ids"], labels=batch["labels"]).logits - expected).abs().max() <= 1e-5


def test_unmerge_adapter_restores_weights_bitwise():
    model = tagi("bart", instruction_fusion=False)
    batch = make_batch("bart")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1], batch["instruction_attention_mask"][:1])
    with model.base_model.use_adapter(adapter):
        model.merge_adapter()
        model.unmerge_adapter()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())
