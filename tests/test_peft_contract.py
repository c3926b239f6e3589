"""PEFT's generic method contract (peft tests/testing_common.py), held for TAGI: gradient checkpointing, half
precision, trainability, low_cpu_mem_usage and delete/unload."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import BUILDERS, SEQ2SEQ, make_batch, randomize_hypernetwork, task_type, toy_examples, word_tokenizer
from peft import PeftModel, get_peft_model

from peft_tagi import TagiConfig, TagiTrainer, TagiTrainingArguments
from peft_tagi.trainer import tagi_model_of


def tagi(family: str, seed: int = 0, base=None, **config):
    config = {"r": 4, "lora_alpha": 8, "hypernetwork_hidden_size": 32, "module_embedding_dim": 8, **config}
    base = BUILDERS[family](seed) if base is None else base
    model = get_peft_model(base, TagiConfig(task_type=task_type(family), **config))
    randomize_hypernetwork(model)
    return model


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- gradient checkpointing

CHECKPOINT_CASES = [
    (family, fusion, reentrant)
    for family in ("t5", "bart", "gpt2", "llama")
    for fusion in ((True, False) if family in SEQ2SEQ else (False,))
    for reentrant in (False, True)
]


def _step(family: str, fusion: bool, checkpointing: dict | None):
    model = tagi(family, instruction_fusion=fusion)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    loss = model(**make_batch(family)).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainable(model).items()}


@pytest.mark.parametrize("family,fusion,reentrant", CHECKPOINT_CASES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, fusion, reentrant):
    ref_loss, ref_grads = _step(family, fusion, None)
    loss, grads = _step(family, fusion, {"use_reentrant": reentrant})
    assert ref_grads and all(g is not None and g.abs().sum() > 0 for g in ref_grads.values() if g is not None)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for name, ref in ref_grads.items():
        assert grads[name] is not None, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=0, msg=name)


def test_checkpointing_enabled_before_get_peft_model_is_picked_up():
    # peft.prepare_model_for_kbit_training enables checkpointing on the base before the adapter exists.
    base = BUILDERS["t5"]()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = tagi("t5", base=base)
    model.train()
    model(**make_batch("t5")).loss.backward()
    grads = [p.grad for p in trainable(model).values()]
    assert grads and all(g is not None for g in grads)


@pytest.fixture(scope="module")
def toy():
    return datasets.Dataset.from_list(toy_examples())


def _args(tmp_path, stage, **kw):
    return TagiTrainingArguments(
        output_dir=str(tmp_path / stage), stage=stage, max_steps=2, per_device_train_batch_size=4, report_to=[],
        logging_steps=1, save_strategy="no", learning_rate=1e-2, use_cpu=True, disable_tqdm=True, seed=0,
        data_seed=0, lr_scheduler_type="constant", **kw,
    )  # fmt: skip


def _distill_trainer(model, tmp_path, mode: str, toy, tok, max_steps: int = 2, **extra) -> TagiTrainer:
    """A distill-stage trainer on the teachers that tmp_path/teachers/teachers holds, writing to tmp_path/mode."""
    args = _args(tmp_path / mode, "distill", **extra)
    args.max_steps = max_steps
    teachers = tmp_path / "teachers" / "teachers"
    return TagiTrainer(model=model, args=args, train_dataset=toy, processing_class=tok, teachers=teachers)


@pytest.mark.parametrize("reentrant", [False, True])
def test_trainer_stages_with_gradient_checkpointing(tmp_path, toy, reentrant):
    kw = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    tok = word_tokenizer()
    model = tagi("t5")
    teachers = TagiTrainer(
        model=model, args=_args(tmp_path, "teachers", **kw), train_dataset=toy, processing_class=tok
    )
    bank = tagi_model_of(model).tagi_teachers["default"]
    before = {n: p.detach().clone() for n, p in bank.named_parameters()}
    teachers.train()
    assert model.base_model.model.is_gradient_checkpointing
    unchanged = [n for n, p in bank.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, f"teacher LoRAs without gradients under checkpointing: {unchanged}"

    losses = {}
    for mode, extra in (("plain", {}), ("checkpointed", kw)):
        model = tagi("t5")
        trainer = _distill_trainer(model, tmp_path, mode, toy, tok, **extra)
        hyper = tagi_model_of(model).hypernetwork
        start = {n: p.detach().clone() for n, p in hyper.named_parameters()}
        trainer.train()
        assert all(not torch.equal(start[n], p) for n, p in hyper.named_parameters() if "pool_query" not in n)
        losses[mode] = {k: v for k, v in trainer.state.log_history[-2].items() if k.startswith("loss_")}
    assert set(losses["checkpointed"]) == {"loss_ce", "loss_kl", "loss_ins"}
    for term, value in losses["plain"].items():
        assert losses["checkpointed"][term] == pytest.approx(value, rel=1e-4, abs=1e-6), term


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("family", ["t5", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast", ["before", "after"])
def test_half_precision_base(family, dtype, cast, tmp_path):
    base = BUILDERS[family]()
    if cast == "before":
        base = base.to(dtype)
    model = tagi(family, base=base)
    if cast == "after":
        model = model.to(dtype)
    batch = make_batch(family)
    model.train()
    out = model(**batch)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in trainable(model).values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    kwargs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "instruction_input_ids", "instruction_attention_mask")
    }
    with torch.no_grad():
        tokens = model.generate(**kwargs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[0] == batch["input_ids"].shape[0]
    adapter = model.generate_adapter(batch["instruction_input_ids"][:1], batch["instruction_attention_mask"][:1])[0]
    assert all(torch.isfinite(t).all() for t in [*adapter.lora_A.values(), *adapter.lora_B.values()])
    adapter.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_hypernetwork_stays_float32_on_a_half_precision_base():
    model = tagi("t5", base=BUILDERS["t5"]().to(torch.bfloat16))
    hyper = tagi_model_of(model).hypernetwork
    assert {p.dtype for p in hyper.parameters()} == {torch.float32}


def test_half_precision_loading_and_autocast_match_float32(tmp_path):
    model = tagi("t5")
    model.save_pretrained(tmp_path / "ckpt")
    batch = make_batch("t5")
    with torch.no_grad():
        ref = model(**batch).logits
        bf16 = PeftModel.from_pretrained(BUILDERS["t5"]().to(torch.bfloat16), tmp_path / "ckpt")
        logits = bf16(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_logits = model(**batch).logits
    # bf16 keeps 8 bits of mantissa: logits of order 1 agree to a few 1e-2 on average; a rare element near a
    # rounding boundary of an intermediate differs more (measured up to 0.14).
    for half in (logits.float(), autocast_logits.float()):
        assert (half - ref).abs().mean() < 0.02 and (half - ref).abs().max() < 0.25


def test_bf16_distill_run_ends_close_to_the_float32_run(tmp_path, toy):
    tok = word_tokenizer()
    TagiTrainer(model=tagi("t5"), args=_args(tmp_path, "teachers"), train_dataset=toy, processing_class=tok).train()
    final = {}
    for mode, extra in (("fp32", {}), ("bf16", {"bf16": True})):
        model = tagi("t5")
        trainer = _distill_trainer(model, tmp_path, mode, toy, tok, max_steps=6, **extra)
        trainer.train()
        final[mode] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    # Six steps at lr 1e-2 under bf16 autocast (the base computes in bf16, the hypernetwork in fp32). Measured: the
    # per-step losses differ by up to 7 % (rounding changes the trajectory), their means by 0.15 %. Stated
    # tolerance: 10 % per step, 3 % on the mean, and both runs must learn.
    for fp32, bf16 in zip(final["fp32"], final["bf16"], strict=True):
        assert bf16 == pytest.approx(fp32, rel=0.10)
    assert sum(final["bf16"]) == pytest.approx(sum(final["fp32"]), rel=0.03)
    assert final["bf16"][-1] < final["bf16"][0] and final["fp32"][-1] < final["fp32"][0]


# ---------------------------------------------------------------- trainability


def test_inference_mode_freezes_everything(capsys):
    model = tagi("t5", inference_mode=True)
    assert model.get_nb_trainable_parameters()[0] == 0
    assert not trainable(model)
    model.print_trainable_parameters()
    assert "trainable params: 0 " in capsys.readouterr().out


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_trains_only_when_asked(tmp_path, is_trainable):
    model = tagi("t5")
    n_hyper = sum(p.numel() for p in tagi_model_of(model).hypernetwork.parameters())
    model.save_pretrained(tmp_path / "ckpt")
    loaded = PeftModel.from_pretrained(BUILDERS["t5"](), tmp_path / "ckpt", is_trainable=is_trainable)
    names = set(trainable(loaded))
    hyper_names = {n for n, _ in loaded.named_parameters() if ".tagi_hypernetwork." in n}
    assert names == (hyper_names if is_trainable else set())
    assert loaded.get_nb_trainable_parameters()[0] == (n_hyper if is_trainable else 0)


# ---------------------------------------------------------------- low_cpu_mem_usage


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_low_cpu_mem_usage_load_equals_normal_load(tmp_path, family):
    model = tagi(family)
    model.save_pretrained(tmp_path / "ckpt")
    batch = make_batch(family)
    normal = PeftModel.from_pretrained(BUILDERS[family](), tmp_path / "ckpt")
    low = PeftModel.from_pretrained(BUILDERS[family](), tmp_path / "ckpt", low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in low.parameters())
    with torch.no_grad():
        torch.testing.assert_close(low(**batch).logits, normal(**batch).logits, atol=0, rtol=0)


# ---------------------------------------------------------------- delete / unload


@pytest.mark.parametrize("how", ["delete_adapter", "unload"])
def test_delete_and_unload_restore_the_base_exactly(how):
    reference = BUILDERS["t5"]()
    model = tagi("t5")
    batch = make_batch("t5")
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if how == "delete_adapter":
        model.delete_adapter("default")
        assert not model.peft_config and model.active_adapters == []
        assert not any("tagi" in n for n, _ in model.named_parameters())
        with pytest.raises(ValueError, match="was deleted"):
            model.base_model(**batch)  # the tuner itself; peft's PeftModel has no active config left to run
        base = model.base_model.model  # peft's get_base_model() needs an active config, as for LoRA
    else:
        base = model.unload()
    assert not any("tagi" in type(m).__name__.lower() or "tagi" in n for n, m in base.named_modules())
    assert set(base.state_dict()) == set(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(base(**plain).logits, reference(**plain).logits, atol=0, rtol=0)


def test_delete_unknown_or_merged_adapter_is_refused():
    model = tagi("t5", instruction_fusion=False)
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("other")
    batch = make_batch("t5")
    adapter = model.generate_adapter(batch["instruction_input_ids"][:1])[0]
    with model.use_adapter(adapter):
        model.merge_adapter()
        with pytest.raises(ValueError, match="unmerge_adapter"):
            model.delete_adapter("default")
        model.unmerge_adapter()


# ---------------------------------------------------------------- peft's conversion API


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_peft_conversion_to_lora_reproduces_the_exported_adapter(family, tmp_path):
    """`convert_to_lora` / `save_as_lora` inside `use_adapter` give the LoRA that `TaskAdapter.save_lora` writes."""
    from peft.tuners.lora.conversion import convert_to_lora, save_as_lora

    model = tagi(family)
    batch = make_batch(family)
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1], batch["instruction_attention_mask"][:1])
    adapter.save_lora(tmp_path / "exported")
    rank = model.peft_config["default"].r
    with pytest.raises(ValueError, match=r"inside `with model.use_adapter\(task_adapter\):`"):
        convert_to_lora(model, rank=rank)
    with model.use_adapter(adapter):
        config, state = convert_to_lora(model, rank=rank)
        save_as_lora(tmp_path / "converted", model, rank=rank)
    assert config.r == rank and len(state) == 2 * len(adapter.target_modules)
    plain = {k: v for k, v in batch.items() if not k.startswith("instruction")}
    logits = {}
    for name in ("exported", "converted"):
        lora = PeftModel.from_pretrained(BUILDERS[family](), tmp_path / name).eval()
        with torch.no_grad():
            logits[name] = lora(**plain).logits
    with torch.no_grad():
        base = BUILDERS[family]()(**plain).logits
    assert (logits["converted"] - logits["exported"]).abs().max() <= 1e-5
    assert (logits["exported"] - base).abs().max() > 1e-3  # the adapter does something
