"""The TAGI PEFT method: registration, config, injection, per-example adapters, fusion, families, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import BUILDERS, SEQ2SEQ, make_batch, randomize_hypernetwork, run_python, task_type, tiny_t5
from peft import PeftConfig, PeftModel, PeftType, get_peft_model

import peft_tagi
from peft_tagi import TagiConfig, TagiLinear


def tagi(family: str, seed: int = 0, **config):
    base = BUILDERS[family](seed)
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    config.setdefault("hypernetwork_hidden_size", 32)
    config.setdefault("module_embedding_dim", 8)
    return get_peft_model(base, TagiConfig(task_type=task_type(family), **config))


# ---------------------------------------------------------------- 1. registration


def test_registration_is_idempotent_in_a_fresh_process():
    run_python(
        "import peft.tuners.lora, peft.mapping\n"
        "from peft import PeftType\n"
        "import importlib, peft_tagi\n"
        "importlib.reload(peft_tagi)\n"
        "import peft_tagi\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
        "assert list(PeftType).count(PeftType.TAGI) == 1\n"
        "assert PeftType('TAGI') is PeftType.TAGI\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TAGI].__name__ == 'TagiModel'\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TAGI].__name__ == 'TagiConfig'\n"
    )


def test_registered_in_peft_mappings():
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TAGI] is peft_tagi.TagiModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TAGI] == "tagi_"


# ---------------------------------------------------------------- 2. config


def test_config_documents_every_field():
    doc = TagiConfig.__doc__
    own = [f for f in TagiConfig.__dataclass_fields__ if f not in PeftConfig.__dataclass_fields__]
    assert own, "TagiConfig has no fields of its own"
    for name in own:
        assert f"{name} (" in doc, f"TagiConfig docstring does not document {name}"


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("r", 0, "r must be a positive integer"),
        ("lora_alpha", -1, "lora_alpha must be a positive number"),
        ("lora_dropout", 1.5, "lora_dropout must be in [0, 1)"),
        ("pooling", "max", "pooling must be one of ['mean', 'attention']"),
        ("pooling_queries", 0, "pooling_queries must be a positive integer"),
        ("pooling_queries", 2, "needs learned queries: set pooling='attention'"),
        ("instruction_overflow", "drop", "instruction_overflow must be one of ['truncate', 'error']"),
        ("max_instruction_length", 0, "max_instruction_length must be a positive integer"),
        ("hypernetwork_hidden_size", 2.5, "hypernetwork_hidden_size must be a positive integer"),
        ("target_modules", [], "target_modules must be a non-empty list"),
        ("instruction_fusion", "yes", "instruction_fusion must be True, False or None"),
    ],
)
def test_config_rejects_invalid_values(field, value, needle):
    with pytest.raises(ValueError, match=None) as err:
        TagiConfig(task_type="SEQ_2_SEQ_LM", **{field: value})
    assert needle in str(err.value)


def test_config_defaults_and_fusion_rules():
    assert TagiConfig(task_type="SEQ_2_SEQ_LM").instruction_fusion is True
    assert TagiConfig(task_type="CAUSAL_LM").instruction_fusion is False
    with pytest.raises(ValueError, match="instruction_fusion=True needs an encoder-decoder"):
        TagiConfig(task_type="CAUSAL_LM", instruction_fusion=True)
    with pytest.raises(ValueError, match="task_type='SEQ_CLS' is not supported"):
        TagiConfig(task_type="SEQ_CLS")


@pytest.mark.parametrize(
    ("family", "expected"),
    [("t5", {"q", "v"}), ("bart", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}), ("llama", {"q_proj", "v_proj"})],
)
def test_default_target_modules_per_family(family, expected):
    model = tagi(family)
    assert set(model.peft_config["default"].target_modules) == expected
    targeted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, TagiLinear)}
    assert targeted == expected


def test_missing_target_modules_and_wrong_task_type_are_explained():
    with pytest.raises(ValueError, match="not found in the base model|Target modules"):
        tagi("t5", target_modules=["nonexistent"])
    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        get_peft_model(BUILDERS["gpt2"](), TagiConfig(task_type="SEQ_2_SEQ_LM"))


# ---------------------------------------------------------------- 3. frozen base, zero init


def test_only_hypernetwork_trains_and_count_is_accurate(capsys):
    model = tagi("t5")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".tagi_hypernetwork." in n for n in trainable)
    n_hyper = sum(p.numel() for p in model.base_model.tagi_hypernetwork.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert f"trainable params: {n_hyper:,}" in printed and f"all params: {n_all:,}" in printed


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_fresh_hypernetwork_writes_zero_delta_and_matches_base(family):
    base = BUILDERS[family]()
    reference = copy.deepcopy(base)
    batch = make_batch(family)
    model = get_peft_model(base, TagiConfig(task_type=task_type(family), r=4, instruction_fusion=False))
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1])
    assert all(torch.count_nonzero(adapter.delta_weight(n)) == 0 for n in adapter.target_modules)
    plain = {k: v for k, v in batch.items() if not k.startswith("instruction")}
    # under no_grad on both sides: SDPA picks its CPU kernel by whether gradients are needed
    assert torch.equal(_logits(model, batch), _logits(reference, plain))


# ---------------------------------------------------------------- 4. per-example adapters


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_rows_get_their_own_adapter_and_do_not_depend_on_each_other(family):
    model = tagi(family)
    randomize_hypernetwork(model)
    batch = make_batch(family)
    together = model(**batch).logits
    for row in range(3):
        alone = model(**{k: v[row : row + 1] for k, v in batch.items()}).logits
        assert (together[row : row + 1] - alone).abs().max() <= 1e-5
    a, b = model.generate_adapter(batch["instruction_input_ids"][:2], batch["instruction_attention_mask"][:2])
    name = a.target_modules[0]
    assert not torch.allclose(a.delta_weight(name), b.delta_weight(name))


def test_identical_instructions_are_encoded_and_generated_once():
    model = tagi("t5")
    randomize_hypernetwork(model)
    batch = make_batch("t5", batch=4)
    batch["instruction_input_ids"][1] = batch["instruction_input_ids"][0]
    batch["instruction_input_ids"][3] = batch["instruction_input_ids"][0]
    batch["instruction_attention_mask"][:] = 1
    encoded_sizes, generated_sizes = [], []
    encoder = model.get_base_model().get_encoder()
    hyper = model.base_model.hypernetwork
    h1 = encoder.register_forward_hook(
        lambda m, a, k, o: encoded_sizes.append(k["input_ids"].shape[0]), with_kwargs=True
    )
    h2 = hyper.register_forward_hook(lambda m, a, o: generated_sizes.append(a[0].shape[0]))
    try:
        model(**batch)
    finally:
        h1.remove(), h2.remove()
    # the first encoder call is the instruction batch (2 unique), the second the inputs (4 rows)
    assert encoded_sizes == [2, 4] and generated_sizes == [2]
    adapters = model.generate_adapter(batch["instruction_input_ids"], batch["instruction_attention_mask"])
    assert adapters[0] is adapters[1] is adapters[3] and adapters[2] is not adapters[0]


@pytest.mark.parametrize("queries", [1, 3])
def test_padding_does_not_change_the_generated_adapter(queries):
    model = tagi("t5", pooling="attention", pooling_queries=queries)
    randomize_hypernetwork(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    [a] = model.generate_adapter(ids)
    [b] = model.generate_adapter(padded, mask)
    assert all(torch.equal(a.lora_A[n], b.lora_A[n]) and torch.equal(a.lora_B[n], b.lora_B[n]) for n in a.lora_A)


def test_several_pooling_queries_read_where_the_steps_are_written():
    """A mean is the same for "a, then b" and "b, then a"; queries with position biases are not. Fresh, every query
    is the masked mean, so a fresh hypernetwork with several queries reads the instruction as the mean does."""
    from peft_tagi.hypernetwork import TagiHypernetwork, TargetSpec

    torch.manual_seed(0)
    states, mask = torch.randn(1, 8, 16), torch.ones(1, 8)
    swapped = torch.cat([states[:, 4:], states[:, :4]], dim=1)  # the second half's tokens written first

    def make(pooling, queries):
        torch.manual_seed(0)
        return TagiHypernetwork(16, [TargetSpec("q", 16, 16)], 2, 8, 4, pooling=pooling, pooling_queries=queries)

    mean, queried = make("mean", 1), make("attention", 2)
    assert torch.allclose(queried.pool(states, mask), states.mean(1, keepdim=True).expand(1, 2, 16), atol=1e-6)
    assert torch.allclose(mean.pool(states, mask), mean.pool(swapped, mask), atol=1e-6)
    with torch.no_grad():  # query 0 reads the first half of the instruction, query 1 the second
        queried.pool_position_bias.copy_(torch.tensor([[4.0] * 4 + [-4.0] * 4, [-4.0] * 4 + [4.0] * 4]))
    pooled = queried.pool(states, mask)
    assert torch.allclose(pooled.flip(1), queried.pool(swapped, mask), atol=1e-6)
    assert not torch.allclose(pooled, queried.pool(swapped, mask), atol=1e-2)
    first, second = queried(states, mask)["q"], queried(swapped, mask)["q"]
    assert not torch.allclose(first[0], second[0], atol=1e-4)  # a different adapter for the other order


def test_several_pooling_queries_save_and_reload(tmp_path):
    base = tiny_t5()
    fresh = copy.deepcopy(base)
    model = get_peft_model(
        base,
        TagiConfig(task_type="SEQ_2_SEQ_LM", r=4, hypernetwork_hidden_size=32, pooling="attention", pooling_queries=3),
    )
    randomize_hypernetwork(model)
    batch = make_batch("t5")
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())["pooling_queries"] == 3
    assert torch.equal(_logits(PeftModel.from_pretrained(fresh, tmp_path / "ckpt"), batch), expected)


# ---------------------------------------------------------------- 5. fusion


def test_fusion_decoder_sees_instruction_with_masks_respected():
    model = tagi("t5", instruction_fusion=True)
    batch = make_batch("t5")
    out_fused = model(**batch).logits
    seen = {}
    decoder = model.get_base_model().get_decoder()

    def record(module, args, kwargs):
        seen["states"] = kwargs["encoder_hidden_states"].shape
        seen["mask"] = kwargs["encoder_attention_mask"].clone()

    # registered after the fusion hook, so it sees the fused inputs
    handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
    model(**batch)
    handle.remove()
    ins_len = int(batch["instruction_attention_mask"].bool().any(0).sum())
    assert seen["states"][1] == ins_len + batch["input_ids"].shape[1]
    assert seen["mask"][2].tolist() == batch["instruction_attention_mask"][2].tolist() + [1] * 7
    # masked instruction padding must not matter: extend row 2's padding, outputs stay equal
    longer = dict(batch)
    longer["instruction_input_ids"] = torch.cat(
        [batch["instruction_input_ids"], torch.zeros(3, 3, dtype=torch.long)], 1
    )
    longer["instruction_attention_mask"] = torch.cat(
        [batch["instruction_attention_mask"], torch.zeros(3, 3, dtype=torch.long)], 1
    )
    assert torch.allclose(model(**longer).logits, out_fused, atol=1e-5)
    # fusion changes the output (decoder reads the instruction) even with ΔW = 0
    with model.disable_adapter():
        assert not torch.allclose(model(**batch).logits, out_fused)


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_greedy_and_beam_with_and_without_fusion(family, fusion, num_beams):
    model = tagi(family, instruction_fusion=fusion)
    randomize_hypernetwork(model)
    batch = make_batch(family)
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    out = model.generate(**kwargs, max_new_tokens=5, num_beams=num_beams, do_sample=False)
    assert out.shape[0] == 3
    # a row generates the same alone as in the batch
    alone = model.generate(**{k: v[1:2] for k, v in kwargs.items()}, max_new_tokens=5, num_beams=num_beams)
    assert alone[0].tolist() == out[1, : alone.shape[1]].tolist()
    # generation from a cached TaskAdapter equals generation from the instruction ids
    [adapter] = model.generate_adapter(kwargs["instruction_input_ids"][1:2], kwargs["instruction_attention_mask"][1:2])
    with model.use_adapter(adapter):
        cached = model.generate(input_ids=kwargs["input_ids"][1:2], max_new_tokens=5, num_beams=num_beams)
    assert cached.tolist() == alone.tolist()


# ---------------------------------------------------------------- 6. families: forward, backward, generate


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_family_forward_backward_generate(family):
    model = tagi(family)
    randomize_hypernetwork(model)
    batch = make_batch(family)
    out = model(**batch)
    out.loss.backward()
    grads = [p.grad for p in model.base_model.tagi_hypernetwork.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "tagi_hypernetwork" not in n)
    gen_kwargs = {k: v for k, v in batch.items() if k != "labels"}
    generated = model.generate(**gen_kwargs, max_new_tokens=4, pad_token_id=0)
    assert generated.shape[0] == 3


# ---------------------------------------------------------------- save / load


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_save_and_reload_in_process(family, tmp_path):
    base = BUILDERS[family]()
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, TagiConfig(task_type=task_type(family), r=4, hypernetwork_hidden_size=32))
    randomize_hypernetwork(model)
    batch = make_batch(family)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TAGI" and config["r"] == 4
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, batch), expected)


def test_checkpoint_from_before_normalized_heads_is_refused_until_marked_and_then_loads_exactly(tmp_path):
    model = tagi("t5", normalized_heads=False)
    randomize_hypernetwork(model)
    assert model.base_model.hypernetwork.head_scale == 1.0
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.base_model.hypernetwork.trunk)
    batch = make_batch("t5")
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["normalized_heads"]  # what a checkpoint written before the option existed looks like
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks the fields \['normalized_heads'\].*\"normalized_heads\": false"):
        PeftModel.from_pretrained(tiny_t5(), tmp_path / "ckpt")
    path.write_text(json.dumps({**config, "normalized_heads": False}))
    loaded = PeftModel.from_pretrained(tiny_t5(), tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, batch), expected)
    default = tagi("t5").base_model.hypernetwork
    assert default.head_scale == 1 / 32 and isinstance(default.trunk[-1], torch.nn.LayerNorm)


def test_reload_in_fresh_process_gives_identical_logits(tmp_path):
    base = tiny_t5()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, TagiConfig(task_type="SEQ_2_SEQ_LM", r=4, hypernetwork_hidden_size=32))
    randomize_hypernetwork(model)
    batch = make_batch("t5")
    torch.save(batch, tmp_path / "batch.pt")
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "ckpt")
    run_python(
        "import torch, peft_tagi\n"
        "from peft import PeftConfig, PeftModel\n"
        "from transformers import T5ForConditionalGeneration\n"
        f"root = {str(tmp_path)!r}\n"
        "config = PeftConfig.from_pretrained(root + '/ckpt')\n"
        "assert type(config).__name__ == 'TagiConfig', type(config)\n"
        "base = T5ForConditionalGeneration.from_pretrained(root + '/base')\n"
        "model = PeftModel.from_pretrained(base, root + '/ckpt').eval()\n"
        "batch = torch.load(root + '/batch.pt', weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(model(**batch).logits, root + '/logits.pt')\n"
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)


# ---------------------------------------------------------------- 7. export


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_exported_lora_loads_in_plain_peft_with_equal_logits(family, tmp_path):
    base = BUILDERS[family]()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, TagiConfig(task_type=task_type(family), r=4, instruction_fusion=False))
    randomize_hypernetwork(model)
    batch = make_batch(family)
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1])
    plain = {k: v for k, v in batch.items() if not k.startswith("instruction")}
    with model.use_adapter(adapter):
        expected = _logits(model, plain)
    with model.disable_adapter():
        assert not torch.allclose(_logits(model, plain), expected, atol=1e-4)
    adapter.save_lora(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == adapter.lora_alpha
    assert config["task_type"] == task_type(family) and sorted(config["target_modules"]) == adapter.target_modules
    torch.save(plain, tmp_path / "batch.pt")
    cls = type(base).__name__
    run_python(
        "import sys, torch\n"
        "from peft import PeftModel\n"
        f"from transformers import {cls}\n"
        f"root = {str(tmp_path)!r}\n"
        f"base = {cls}.from_pretrained(root + '/base')\n"
        "model = PeftModel.from_pretrained(base, root + '/lora').eval()\n"
        "batch = torch.load(root + '/batch.pt', weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(model(**batch).logits, root + '/logits.pt')\n"
        "assert 'peft_tagi' not in sys.modules\n"
        "from safetensors.torch import load_file\n"
        "keys = list(load_file(root + '/lora/adapter_model.safetensors'))\n"
        "assert all(k.startswith('base_model.model.') and k.endswith(('.lora_A.weight', '.lora_B.weight')) for k in keys)\n"
    )
    assert (torch.load(tmp_path / "logits.pt", weights_only=True) - expected).abs().max() <= 1e-5


def test_fusion_export_keeps_instruction_states_and_explains_plain_use(tmp_path):
    model = tagi("t5", instruction_fusion=True)
    randomize_hypernetwork(model)
    batch = make_batch("t5")
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1], instructions=["Reverse the words."])
    adapter.save_lora(tmp_path / "lora")
    files = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tagi_instruction_states.safetensors"} <= files
    readme = (tmp_path / "lora" / "README.md").read_text()
    assert "drops fusion" in readme and "Reverse the words." in readme
    restored = peft_tagi.TaskAdapter.load(tmp_path / "lora")
    assert restored.instruction == "Reverse the words."
    plain = {k: v for k, v in batch.items() if not k.startswith("instruction")}
    with model.use_adapter(adapter):
        expected = _logits(model, plain)
    with model.use_adapter(restored):
        assert torch.equal(_logits(model, plain), expected)
    from_ids = {k: v[:1] for k, v in batch.items()}
    assert (_logits(model, from_ids) - expected[:1]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_merge_and_unload_under_task_adapter(family):
    model = tagi(family, instruction_fusion=False)
    randomize_hypernetwork(model)
    batch = make_batch(family)
    plain = {k: v for k, v in batch.items() if not k.startswith("instruction")}
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1])
    with model.use_adapter(adapter):
        expected = _logits(model, plain)
        merged = model.merge_and_unload()
    assert not any(isinstance(m, TagiLinear) for m in merged.modules())
    assert (_logits(merged, plain) - expected).abs().max() <= 1e-5


def test_merge_without_task_adapter_is_refused():
    model = tagi("t5")
    with pytest.raises(ValueError, match="use_adapter"):
        model.merge_and_unload()


# ---------------------------------------------------------------- 8. disable_adapter


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_disable_adapter_gives_base_outputs_exactly(family):
    base = BUILDERS[family]()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, TagiConfig(task_type=task_type(family), r=4))
    randomize_hypernetwork(model)
    batch = make_batch(family)
    plain = {k: v for k, v in batch.items() if not k.startswith("instruction")}
    expected = _logits(reference, plain)
    assert not torch.equal(_logits(model, batch), expected)
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), expected)
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1])
    with model.use_adapter(adapter), model.disable_adapter():
        assert torch.equal(_logits(model, plain), expected)


def test_per_row_task_weights_have_reproducible_gradients_when_rows_share_a_task():
    # Rows that share a task (a teacher bank's batch, repeated instructions) add their gradients into one entry. Two
    # threads summing them in a varying order made the oracle's and the parameter teachers' LoRAs differ between two
    # runs of the same command; gathering with index_select sums them in a fixed order.
    torch.set_num_threads(2)  # restored by the torch_threads_restored fixture
    layer = TagiLinear(torch.nn.Linear(128, 128), "default", r=8, lora_alpha=16, lora_dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    lora_A = torch.randn(12, 8, 128, generator=generator).requires_grad_(True)
    lora_B = torch.randn(12, 128, 8, generator=generator).requires_grad_(True)
    row_index = torch.randint(0, 12, (64,), generator=generator)  # 64 rows over 12 tasks: most share one
    x = torch.randn(64, 20, 128, generator=generator)
    grads = set()
    for _ in range(8):
        lora_A.grad = lora_B.grad = None
        layer.set_task_weights(lora_A, lora_B, row_index)
        layer(x).pow(2).sum().backward()
        grads.add((lora_A.grad.numpy().tobytes(), lora_B.grad.numpy().tobytes()))
    assert len(grads) == 1
