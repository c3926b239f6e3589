"""Serving: the instruction's keys / values projected once per task and shared (fusion.py), `use_adapter(merge=True)`.

The shared route (no gradients) must give what the concatenated route gives: the reference is the same model with
its `InstructionFusion.shares_instruction_kv` switched off, which makes every row attend to its own [instruction ; input] as in training.
"""

from __future__ import annotations

import copy
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
    model.base_model.fusion.shares_instruction_kv = False
    try:
        yield
    finally:
        model.base_model.fusion.shares_instruction_kv = True


def cross_attentions(model) -> list[torch.nn.Module]:
    names = ("EncDecAttention", "encoder_attn")
    return [m for n, m in model.get_base_model().get_decoder().named_modules() if n.endswith(names)]


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
    assert model.base_model.fusion.shares_instruction_kv and model.base_model.fusion.modules == cross_attentions(model)
    batch = make_batch(family, batch=4, seed=1)  # rows 0, 1, 2 differ in instruction: a mixed-task batch
    batch["instruction_input_ids"][3] = batch["instruction_input_ids"][0]
    batch["instruction_attention_mask"][3] = batch["instruction_attention_mask"][0]
    batch["attention_mask"][1, -3:] = 0  # a padded input: the input part's mask must reach the shared attention
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
        cached = model.base_model.fusion.task.instruction_kv
    for attention in cross_attentions(model):
        # (T, H, S_ins, d): one task, its instruction's keys and values for all 4 heads
        assert cached[attention].key.shape[:3] == cached[attention].value.shape[:3] == (1, 4, ins_len)
    for module in kv_projections(model):
        instruction_calls = [shape for shape in calls[module] if shape[1] == ins_len]
        # one projection of the one task's instruction (1 row), whatever the rows, beams, batches and steps
        assert instruction_calls == [(1, ins_len)], calls[module]
        # the inputs are projected once per batch (then the cross-attention cache serves every step)
        assert [shape for shape in calls[module] if shape[1] != ins_len] == [(6, 7), (6, 7)]


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_cross_attention_cache_keeps_only_the_input_part_for_one_task(family):
    model = tagi(family)
    batch = make_batch(family)  # three rows, three instructions
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    ins_len, in_len = batch["instruction_input_ids"].shape[1], batch["input_ids"].shape[1]
    [adapter] = model.generate_adapter(kwargs["instruction_input_ids"][:1], kwargs["instruction_attention_mask"][:1])
    options = dict(max_new_tokens=3, min_new_tokens=3, num_beams=2, return_dict_in_generate=True)
    lengths = {}
    for route in ("shared", "concatenated"):
        context = concatenated(model) if route == "concatenated" else contextmanager(lambda: (yield))()
        with torch.no_grad(), context:
            with model.base_model.use_adapter(adapter):
                one_task = model.generate(input_ids=batch["input_ids"], **options).past_key_values
            mixed = model.generate(**kwargs, **options).past_key_values
        for cache in (one_task, mixed):  # rows x beams in the cache
            assert {layer.keys.shape[0] for layer in cache.cross_attention_cache.layers} == {6}
        lengths[route] = [{layer.keys.shape[2] for layer in c.cross_attention_cache.layers} for c in (one_task, mixed)]
    # one task: the instruction's keys are kept once, apart; several: each row's copy sits next to its input's
    assert lengths == {"shared": [{in_len}, {ins_len + in_len}], "concatenated": [{ins_len + in_len}] * 2}


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_shared_route_with_eager_attention_returns_the_concatenations_weights(family):
    model = tagi(family)
    model.get_base_model().set_attn_implementation("eager")
    batch = make_batch(family, batch=4)
    batch["attention_mask"][0, -2:] = 0
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1], batch["instruction_attention_mask"][:1])
    plain = {k: v for k, v in batch.items() if not k.startswith("instruction")}
    outputs = {}
    for route in ("shared", "concatenated"):
        context = concatenated(model) if route == "concatenated" else contextmanager(lambda: (yield))()
        with torch.no_grad(), context:
            mixed = model(**batch, output_attentions=True)  # four tasks
            with model.base_model.use_adapter(adapter):
                one_task = model(**plain, output_attentions=True)
        outputs[route] = (mixed, one_task)
    ins_len, in_len = batch["instruction_input_ids"].shape[1], batch["input_ids"].shape[1]
    for shared, reference in zip(outputs["shared"], outputs["concatenated"]):
        assert (shared.logits - reference.logits).abs().max() <= 1e-5
        for weights, expected in zip(shared.cross_attentions, reference.cross_attentions):
            assert weights.shape == (4, 4, batch["labels"].shape[1], ins_len + in_len)
            assert (weights - expected).abs().max() <= 1e-6
        assert float(shared.cross_attentions[0][0, :, :, -2:].abs().max()) == 0.0  # padding gets no weight
    mixed = outputs["shared"][0]
    assert float(mixed.cross_attentions[0][2, :, :, ins_len - 2 : ins_len].abs().max()) == 0.0  # row 2's too


def test_training_mode_without_gradients_attends_to_the_concatenation():
    """Attention dropout is the module's own: in training mode the shared route is not taken."""
    model = tagi("t5", lora_dropout=0.0)
    batch = make_batch("t5")
    seen = []
    handle = (
        model.get_base_model()
        .get_decoder()
        .register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True
        )
    )
    with torch.no_grad():
        model.train()
        model(**batch)
        model.eval()
        model(**batch)
    handle.remove()
    ins_len, in_len = batch["instruction_input_ids"].shape[1], batch["input_ids"].shape[1]
    assert seen == [ins_len + in_len, in_len]


def test_unload_restores_the_cross_attention_forward_and_deepcopy_keeps_the_route():
    model = tagi("bart")
    batch = make_batch("bart")
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    options = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2)
    with torch.no_grad():
        expected = model.generate(**kwargs, **options)
        twin = copy.deepcopy(model)
        assert twin.base_model.fusion.modules == cross_attentions(twin)
        assert all(m.forward.func.__self__ is twin.base_model.fusion for m in cross_attentions(twin))
        assert torch.equal(twin.generate(**kwargs, **options), expected)
    attentions = cross_attentions(model)
    model.unload()
    assert all("forward" not in vars(m) for m in attentions)


def test_a_forward_set_on_the_module_before_injection_is_wrapped_and_put_back():
    """As accelerate's hooks set one: it keeps running on the concatenated route and comes back on unload."""
    base = BUILDERS["t5"]()
    calls = []
    for module in (m for n, m in base.decoder.named_modules() if n.endswith("EncDecAttention")):
        own = module.forward

        def hooked(*args, _own=own, **kwargs):
            calls.append(1)
            return _own(*args, **kwargs)

        module.forward = hooked
    hooked_forwards = [m.forward for n, m in base.decoder.named_modules() if n.endswith("EncDecAttention")]
    config = TagiConfig(task_type="SEQ_2_SEQ_LM", r=4, hypernetwork_hidden_size=32, module_embedding_dim=8)
    model = get_peft_model(base, config)
    batch = make_batch("t5")
    model(**batch)  # with gradients: the concatenated route, through the modules' own (hooked) forward
    assert len(calls) == 2
    model.unload()
    assert [m.forward for n, m in base.decoder.named_modules() if n.endswith("EncDecAttention")] == hooked_forwards


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


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_serving_rows_of_many_instructions_in_one_batch_gives_each_instruction_its_own_outputs(family):
    # serve_by_instruction batches inputs of different instructions, each row under its own adapter: the outputs must
    # be those of every instruction served alone under `use_adapter`, with instructions (and so fusion states) of
    # different lengths in one batch, greedy and with beam search (each row's beams under that row's adapter).
    from conftest import word_tokenizer

    from peft_tagi.pipeline import generate_adapters, generate_outputs, serve_by_instruction

    model, tokenizer = tagi(family), word_tokenizer()
    randomize_hypernetwork(model, std=0.3)  # adapters strong enough that the outputs differ between instructions
    instructions = ["reverse the words", "keep the first two words then drop the last word", "copy all", "say one"]
    inputs = ["cat dog sun", "red blue", "tree milk fish bird", "green", "one word list", "dog cat"]
    examples = [{"instruction": instructions[i % 4], "input": text} for i, text in enumerate(inputs * 2)]
    for generation in ({"max_new_tokens": 5, "batch_size": 5}, {"max_new_tokens": 5, "num_beams": 2}):
        adapters = generate_adapters(model, tokenizer, instructions)
        alone = {}
        for instruction in instructions:
            rows = [e["input"] for e in examples if e["instruction"] == instruction]
            outputs = generate_outputs(
                model, tokenizer, rows, context=lambda a=adapters[instruction]: model.use_adapter(a), **generation
            )
            alone.update({(instruction, text): out for text, out in zip(rows, outputs)})
        served = serve_by_instruction(model, tokenizer, examples, **generation)
        assert served == [alone[(e["instruction"], e["input"])] for e in examples]
        assert len(set(served)) > 2  # the adapters differ: a row under another row's adapter would show
