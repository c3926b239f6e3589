"""TAGI over bitsandbytes 8-bit and 4-bit bases (QLoRA-style): dispatch, training, generation, save/load, merging.

bitsandbytes runs both formats on the CPU. 4-bit (QLoRA's NF4 with double quantization) packs weights in blocks of
64, so the tiny models here are 64 wide.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import VOCAB, make_batch, randomize_hypernetwork, run_python, word_tokenizer
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from transformers import (
    BitsAndBytesConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from peft_tagi import TagiConfig, TagiLinear

requires_bnb = pytest.mark.skipif(
    not (is_bnb_available() and is_bnb_4bit_available()),
    reason="bitsandbytes is not importable (pip install 'peft-tagi[quant]'): no quantized base to test",
)

MODES = ["8bit", "4bit"]
SEQ2SEQ = {"t5"}


def _float_model(family: str):
    torch.manual_seed(0)
    if family == "t5":
        config = T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        return T5ForConditionalGeneration(config).eval()
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        )  # fmt: skip
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    """family -> folder of a 64-wide float model (quantization happens when from_pretrained loads it)."""
    root = tmp_path_factory.mktemp("bases")
    for family in ("t5", "llama", "gpt2"):
        _float_model(family).save_pretrained(root / family)
    return root


def _load(saved_bases, family: str, mode: str | None):
    cls = {"t5": T5ForConditionalGeneration, "llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}[family]
    if mode is None:
        return cls.from_pretrained(saved_bases / family).eval()
    if mode == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    return cls.from_pretrained(saved_bases / family, quantization_config=quantization, device_map="cpu").eval()


def _tagi(base, family: str, **config):
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    config.setdefault("hypernetwork_hidden_size", 32)
    config.setdefault("module_embedding_dim", 8)
    task_type = "SEQ_2_SEQ_LM" if family in SEQ2SEQ else "CAUSAL_LM"
    return get_peft_model(base, TagiConfig(task_type=task_type, **config))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _plain(batch):
    return {k: v for k, v in batch.items() if not k.startswith("instruction")}


# ---------------------------------------------------------------- dispatch


@requires_bnb
@pytest.mark.parametrize("mode", MODES)
def test_quantized_targets_get_their_tagi_layer_with_true_shapes(saved_bases, mode):
    from peft_tagi.bnb import TagiLinear4bit, TagiLinear8bitLt

    expected_cls = TagiLinear8bitLt if mode == "8bit" else TagiLinear4bit
    reference = _tagi(_load(saved_bases, "llama", None), "llama")
    model = _tagi(_load(saved_bases, "llama", mode), "llama")
    layers = [m for m in model.modules() if isinstance(m, TagiLinear)]
    assert layers and all(type(m) is expected_cls for m in layers)
    # A 4-bit weight is stored packed, (in * out / 2, 1): the features must come from the layer, not the weight.
    assert model.base_model.target_specs == reference.base_model.target_specs
    assert (layers[0].in_features, layers[0].out_features) == (64, 64)


@requires_bnb
def test_plain_tagi_layer_refuses_to_merge_into_quantized_weight(saved_bases):
    base = _load(saved_bases, "llama", "8bit")
    layer = TagiLinear(base.model.layers[0].self_attn.q_proj, "default", r=4, lora_alpha=8, lora_dropout=0.0)
    layer.set_task_weights(torch.ones(1, 4, 64), torch.ones(1, 64, 4))
    with pytest.raises(TypeError, match="TagiLinear8bitLt"):
        layer.merge()


def test_unsupported_target_is_refused_with_what_works():
    model = _float_model("llama")
    with pytest.raises(ValueError, match="cannot target Embedding.*Linear8bitLt"):
        _tagi(model, "llama", target_modules=["embed_tokens"])


def test_import_and_use_without_bitsandbytes():
    # sys.modules[name] = None makes both `import bitsandbytes` and importlib's find_spec report it missing.
    run_python(
        "import sys\n"
        "sys.modules['bitsandbytes'] = None\n"
        "import torch, peft_tagi\n"
        "from peft import get_peft_model\n"
        "from peft.import_utils import is_bnb_available\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "assert not is_bnb_available()\n"
        "config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                     num_attention_heads=4, num_key_value_heads=2)\n"
        "model = get_peft_model(LlamaForCausalLM(config), peft_tagi.TagiConfig(task_type='CAUSAL_LM', r=4))\n"
        "layers = [m for m in model.modules() if isinstance(m, peft_tagi.TagiLinear)]\n"
        "assert layers and all(type(m) is peft_tagi.TagiLinear for m in layers)\n"
        "ids = torch.randint(3, 64, (2, 5))\n"
        "model(input_ids=ids, instruction_input_ids=ids)\n"
        "assert 'peft_tagi.bnb' not in sys.modules\n"
    )


# ---------------------------------------------------------------- training, generation, save/load


def _check_training_step(saved_bases, family: str, mode: str, use_gradient_checkpointing: bool) -> None:
    base = prepare_model_for_kbit_training(
        _load(saved_bases, family, mode), use_gradient_checkpointing=use_gradient_checkpointing
    )
    model = _tagi(base, family)
    randomize_hypernetwork(model)
    model.train()
    loss = model(**make_batch(family)).loss
    loss.backward()
    assert torch.isfinite(loss)
    hypernetwork = dict(model.base_model.tagi_hypernetwork.named_parameters())
    assert hypernetwork
    for name, param in hypernetwork.items():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, f"{name}: bad gradient"
    assert all(p.grad is None for n, p in model.named_parameters() if "tagi_hypernetwork" not in n)


@requires_bnb
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_kbit_training_step_reaches_every_hypernetwork_parameter(saved_bases, family, mode):
    _check_training_step(saved_bases, family, mode, use_gradient_checkpointing=False)


@requires_bnb
@pytest.mark.parametrize("mode", MODES)
def test_kbit_training_step_with_gradient_checkpointing(saved_bases, mode):
    _check_training_step(saved_bases, "t5", mode, use_gradient_checkpointing=True)


@requires_bnb
@pytest.mark.parametrize("mode", MODES)
def test_tagi_trainer_trains_only_the_hypernetwork_on_a_quantized_base(saved_bases, mode, tmp_path):
    import datasets

    from peft_tagi import TagiTrainer, TagiTrainingArguments
    from peft_tagi.data.pretraining import pretraining_dataset

    base = prepare_model_for_kbit_training(_load(saved_bases, "t5", mode), use_gradient_checkpointing=False)
    model = _tagi(base, "t5")
    text = ["cat dog sun red blue tree milk fish bird green one word list"] * 8
    args = TagiTrainingArguments(
        output_dir=str(tmp_path), stage="pretrain", max_steps=3, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", learning_rate=1e-2, use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dataset = pretraining_dataset(datasets.Dataset.from_dict({"text": text}))
    trainer = TagiTrainer(model=model, args=args, train_dataset=dataset, processing_class=word_tokenizer())
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("tagi_hypernetwork" in n for n in changed)


@requires_bnb
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_generate_and_generate_adapter(saved_bases, family, mode):
    model = _tagi(_load(saved_bases, family, mode), family)
    randomize_hypernetwork(model)
    batch = make_batch(family, batch=2)
    instructions = {k: v for k, v in batch.items() if k.startswith("instruction")}
    out = model.generate(input_ids=batch["input_ids"], max_new_tokens=4, do_sample=False, **instructions)
    assert out.shape[0] == 2
    adapters = model.generate_adapter(batch["instruction_input_ids"])
    for row, adapter in enumerate(adapters):
        row_inputs = batch["input_ids"][row : row + 1]
        with model.use_adapter(adapter):
            from_adapter = model.generate(input_ids=row_inputs, max_new_tokens=4, do_sample=False)
        from_ids = model.generate(
            input_ids=row_inputs,
            max_new_tokens=4,
            do_sample=False,
            **{k: v[row : row + 1] for k, v in instructions.items()},
        )
        assert torch.equal(from_adapter, from_ids)
        assert torch.equal(from_ids, out[row : row + 1, : from_ids.shape[1]])


@requires_bnb
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_save_and_load_onto_a_fresh_quantized_base(saved_bases, family, mode, tmp_path):
    model = _tagi(_load(saved_bases, family, mode), family)
    randomize_hypernetwork(model)
    batch = make_batch(family)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = PeftModel.from_pretrained(_load(saved_bases, family, mode), tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, batch), expected)


# ---------------------------------------------------------------- merging
# Merging dequantizes the base weight W, adds ΔW and quantizes the sum again, so a merged weight is W + ΔW up to one
# rounding. Its bound follows from the format, per output row (one 4-bit block of 64 values is within a row here):
# - 8-bit: codes are absmax/127 apart, so rounding moves a value by at most half of that; 0.6 allows for the float16
#   cast bitsandbytes quantizes from (relative error 2^-11, i.e. 0.06 of a step).
# - 4-bit NF4: neighbouring codes are at most 0.28 · absmax apart (0.72 -> 1.0), so rounding moves a value by at most
#   0.14 · absmax; 0.17 · absmax allows for the 8-bit double quantization of the block's absmax.
# Unmerging rounds once more, so the restored base is within the sum of the two bounds of the original.


def _rounding_bound(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-row bound (out, 1) on how far quantizing `weight` (out, in) moves any of its values."""
    absmax = weight.abs().amax(dim=1, keepdim=True)
    return 0.6 * absmax / 127 if mode == "8bit" else 0.17 * absmax


def _merge_model(saved_bases, family: str, mode: str):
    model = _tagi(_load(saved_bases, family, mode), family, instruction_fusion=False)
    randomize_hypernetwork(model, std=0.15)
    [adapter] = model.generate_adapter(make_batch(family)["instruction_input_ids"][:1])
    return model, adapter


@requires_bnb
@pytest.mark.parametrize("mode", MODES)
def test_merge_and_unmerge_round_each_weight_once(saved_bases, mode):
    model, adapter = _merge_model(saved_bases, "llama", mode)
    layers = [m for m in model.modules() if isinstance(m, TagiLinear)]
    with model.use_adapter(adapter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = [layer._get_dense_weight().clone() for layer in layers]
        target = [weight + layer.delta_weight() for weight, layer in zip(base, layers)]
        model.merge_adapter()
        for name, layer, weight, expected in zip(model.base_model._layers, layers, base, target):
            bound = _rounding_bound(expected, mode)
            # ΔW exceeds the bound, so a merge that dropped or garbled it could not pass.
            assert ((expected - weight).abs() > 2 * bound).any()
            error = (layer._get_dense_weight() - expected).abs()
            assert (error <= bound).all(), f"{name}: merged weight off by {error.max()}"
        model.unmerge_adapter()
        for name, layer, weight, merged in zip(model.base_model._layers, layers, base, target):
            error = (layer._get_dense_weight() - weight).abs()
            bound = _rounding_bound(merged, mode) + _rounding_bound(weight, mode)
            assert (error <= bound).all(), f"{name}: unmerged weight off by {error.max()}"


@requires_bnb
def test_merge_into_8bit_layer_with_float_weights_is_exact(saved_bases):
    # llm_int8_has_fp16_weight=True keeps float weights (quantized at each forward): nothing to re-quantize.
    quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True)
    base = LlamaForCausalLM.from_pretrained(saved_bases / "llama", quantization_config=quantization, device_map="cpu")
    model = _tagi(base, "llama", instruction_fusion=False)
    randomize_hypernetwork(model, std=0.15)
    [adapter] = model.generate_adapter(make_batch("llama")["instruction_input_ids"][:1])
    layers = [m for m in model.modules() if isinstance(m, TagiLinear)]
    with model.use_adapter(adapter):
        base_weights = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        model.merge_adapter()
        for layer, weight in zip(layers, base_weights):
            merged = layer.get_base_layer().weight
            assert merged.is_floating_point()
            torch.testing.assert_close(merged.detach(), weight + layer.delta_weight(), rtol=0, atol=1e-6)
        model.unmerge_adapter()
    for layer, weight in zip(layers, base_weights):
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), weight, rtol=0, atol=1e-6)


# End to end, the merged model sits one re-quantization away from the unmerged adapter, as the quantized base sits
# one quantization away from its float original. The logits tolerance is therefore a multiple of the latter,
# measured on the same batch: QUANTIZATION_ERRORS × max|logits(quantized base) - logits(float base)|. Re-quantizing
# W + ΔW rounds more coarsely than W where ΔW raises a row's maximum (GPT-2's fused c_attn most), so the measured
# ratios reach 10 (merging: llama 1.2 / 2.3, gpt2 10.0 / 5.4 for 8-bit / 4-bit). The tolerance is also capped at
# half the adapter's own effect on the logits, so a merge that dropped ΔW (error ≈ effect) can never pass.
QUANTIZATION_ERRORS = 12.0


def _quantization_error(saved_bases, family: str, mode: str, batch: dict) -> float:
    float_logits = _logits(_load(saved_bases, family, None), batch)
    return (_logits(_load(saved_bases, family, mode), batch) - float_logits).abs().max().item()


def _merge_setup(saved_bases, family: str, mode: str):
    model, adapter = _merge_model(saved_bases, family, mode)
    batch = _plain(make_batch(family))
    with model.disable_adapter():
        base_logits = _logits(model, batch)
    with model.use_adapter(adapter):
        adapter_logits = _logits(model, batch)
    effect = (adapter_logits - base_logits).abs().max().item()
    tolerance = min(QUANTIZATION_ERRORS * _quantization_error(saved_bases, family, mode, batch), 0.5 * effect)
    return model, adapter, batch, base_logits, adapter_logits, tolerance


@requires_bnb
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_requantizes_within_quantization_error(saved_bases, family, mode):
    import bitsandbytes as bnb

    model, adapter, batch, _, adapter_logits, tolerance = _merge_setup(saved_bases, family, mode)
    with model.use_adapter(adapter), pytest.warns(UserWarning, match="re-quantizes its weight"):
        merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, TagiLinear) for m in merged.modules())
    quantized_cls = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    layers = [m for m in merged.modules() if isinstance(m, quantized_cls)]
    assert layers and all(not m.weight.is_floating_point() for m in layers), "the merged model is no longer quantized"
    error = (_logits(merged, batch) - adapter_logits).abs().max().item()
    assert error <= tolerance, f"merged logits differ by {error}, more than {tolerance}"


@requires_bnb
@pytest.mark.parametrize("mode", MODES)
def test_merge_then_unmerge_restores_the_quantized_base(saved_bases, mode):
    model, adapter, batch, base_logits, adapter_logits, tolerance = _merge_setup(saved_bases, "llama", mode)
    with model.use_adapter(adapter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
        assert (_logits(model, batch) - adapter_logits).abs().max().item() <= tolerance
        model.unmerge_adapter()
    # Unmerging re-quantizes once more, so the base comes back within (not exactly at) its quantized weights.
    with model.disable_adapter():
        error = (_logits(model, batch) - base_logits).abs().max().item()
    assert error <= tolerance, f"unmerged base differs by {error}, more than {tolerance}"
    with model.use_adapter(adapter):
        assert (_logits(model, batch) - adapter_logits).abs().max().item() <= tolerance
