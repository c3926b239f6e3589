"""`TagiConfig(instruction_encoder=...)`: a frozen pretrained text encoder reads the instruction with its own tokenizer.

Tiny BERT encoders built from configs stand in for MiniLM; one test loads the real MiniLM shipped by the [encoder]
extra (skipped, saying why, without it).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BUILDERS, SEQ2SEQ, make_batch, randomize_hypernetwork, task_type, toy_examples, word_tokenizer
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertModel

from peft_tagi import TagiConfig, TaskAdapter
from peft_tagi.instruction_encoder import InstructionEncoder, packaged_encoder_path

INSTRUCTIONS = ["reverse the words", "keep first two words", "copy all the words"]


def tiny_bert(folder, seed: int = 0, hidden: int = 24, tamper=None) -> str:
    """A tiny BERT (random weights) and a word tokenizer saved as an encoder folder; `tamper(model)` breaks it."""
    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=64,
    )  # fmt: skip
    model = BertModel(config)
    if tamper is not None:
        with torch.no_grad():
            tamper(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("encoder"))


def tagi(family: str, encoder: str, **config):
    config = {"r": 4, "lora_alpha": 8, "hypernetwork_hidden_size": 32, "module_embedding_dim": 8, **config}
    model = get_peft_model(
        BUILDERS[family](), TagiConfig(task_type=task_type(family), instruction_encoder=encoder, **config)
    )
    randomize_hypernetwork(model)
    return model


def instruction_batch(model, family: str, rows: int = 3) -> dict:
    batch = make_batch(family, batch=rows)
    ins = model.base_model.instruction_tokenizer(INSTRUCTIONS[:rows], padding=True, return_tensors="pt")
    batch["instruction_input_ids"], batch["instruction_attention_mask"] = ins["input_ids"], ins["attention_mask"]
    return batch


CASES = [
    (family, fusion) for family in sorted(BUILDERS) for fusion in ((True, False) if family in SEQ2SEQ else (False,))
]


@pytest.mark.parametrize("family,fusion", CASES)
def test_encoder_reads_the_instruction_trains_generates_and_serves_cached_adapters(family, fusion, encoder_dir):
    model = tagi(family, encoder_dir, instruction_fusion=fusion)
    tagi_model = model.base_model
    assert (
        tagi_model.instruction_encoder.hidden_size == 24
        and tagi_model.hypernetwork.input_norm.normalized_shape == (24,)
    )
    assert not any("instruction_encoder" in name for name, _ in model.named_parameters())  # frozen, never saved
    batch = instruction_batch(model, family)
    out = model(**batch)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("tagi_hypernetwork" in n for n in grads)
    assert any("fusion_projection" in n for n in grads) == fusion
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
        adapters = model.generate_adapter(batch["instruction_input_ids"], batch["instruction_attention_mask"])
        plain = {k: v for k, v in batch.items() if not k.startswith("instruction")}
        with model.use_adapter(adapters[0]):
            cached = model(**{k: v[:1] for k, v in plain.items()}).logits
        assert (cached - reference[:1]).abs().max() <= 1e-5
        if fusion:  # fusion states are projected to the base model's width, so the adapter serves without the encoder
            assert adapters[0].instruction_states.shape[-1] == model.get_base_model().config.d_model
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3, num_beams=2,
            instruction_input_ids=batch["instruction_input_ids"],
            instruction_attention_mask=batch["instruction_attention_mask"],
        )  # fmt: skip
    assert generated.shape[0] == 3
    assert adapters[0].instruction_encoder == encoder_dir


def test_checkpoint_names_the_encoder_checks_it_on_load_and_loads_lazily_on_the_meta_device(encoder_dir, tmp_path):
    model = tagi("t5", encoder_dir)
    batch = instruction_batch(model, "t5")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert saved["instruction_encoder"] == encoder_dir
    assert saved["instruction_encoder_fingerprint"] == model.base_model.instruction_encoder.fingerprint
    from safetensors.torch import load_file

    assert not any("encoder.layer" in k for k in load_file(tmp_path / "ckpt" / "adapter_model.safetensors"))
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(BUILDERS["t5"](), tmp_path / "ckpt", low_cpu_mem_usage=low_cpu_mem_usage)
        # Under low_cpu_mem_usage the weights load (and are checked) at the first instruction encoded.
        assert (loaded.base_model.instruction_encoder.model is None) == low_cpu_mem_usage
        with torch.no_grad():
            assert torch.equal(loaded(**batch).logits, expected)

    # Another encoder under the same name: refused, naming it.
    tiny_bert(encoder_dir, seed=7)
    try:
        with pytest.raises(ValueError, match="is not the one this TAGI checkpoint was trained with"):
            PeftModel.from_pretrained(BUILDERS["t5"](), tmp_path / "ckpt")
    finally:
        tiny_bert(encoder_dir)


@pytest.mark.parametrize(
    "tamper,message",
    [
        # Weights left at zero: every text embeds to the zero vector.
        (lambda m: [p.zero_() for p in m.parameters()], "embeds instructions to zero vectors"),
        # Every word the same vector and no positions: every text embeds to the same vector.
        (
            lambda m: (
                m.embeddings.word_embeddings.weight.copy_(m.embeddings.word_embeddings.weight[3].clone()),
                m.embeddings.position_embeddings.weight.zero_(),
            ),
            "embeds two different instructions almost identically",
        ),
        (lambda m: m.embeddings.word_embeddings.weight.fill_(float("nan")), "gives non-finite states"),
    ],
    ids=["zero", "constant", "nan"],
)
def test_a_broken_encoder_is_refused_with_its_name_and_the_likely_cause(tmp_path, tamper, message):
    folder = tiny_bert(tmp_path / "broken", tamper=tamper)
    with pytest.raises(ValueError, match=message) as error:
        tagi("t5", folder)
    assert folder in str(error.value)


def test_trainer_tokenizes_instructions_with_the_encoders_tokenizer(encoder_dir, tmp_path):
    from peft_tagi import TagiDataCollator, TagiTrainer, TagiTrainingArguments

    model = tagi("t5", encoder_dir)
    bert_tokenizer = model.base_model.instruction_tokenizer
    base_tokenizer = word_tokenizer()
    # Another vocabulary than the base's: the ids differ, so the wrong tokenizer would show.
    bert_tokenizer.add_tokens(["zzz"])
    args = TagiTrainingArguments(
        output_dir=str(tmp_path / "out"), stage="distill", max_steps=2, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", use_cpu=True, lambda_kl=0.0, lambda_ins=0.0,
    )  # fmt: skip
    import datasets

    data = datasets.Dataset.from_list(toy_examples())
    trainer = TagiTrainer(model=model, args=args, train_dataset=data, processing_class=base_tokenizer)
    collator = trainer.data_collator
    assert isinstance(collator, TagiDataCollator) and collator.instruction_tokenizer is bert_tokenizer
    batch = collator(toy_examples()[:2])
    expected = bert_tokenizer([e["instruction"] for e in toy_examples()[:2]], padding=True, return_tensors="pt")
    assert torch.equal(batch["instruction_input_ids"], expected["input_ids"])
    trainer.train()
    with pytest.raises(ValueError, match="pass a TagiDataCollator"):
        TagiTrainer(model=model, args=args, train_dataset=data, data_collator=lambda rows: rows)


def test_encoder_stays_float32_under_a_bf16_base_and_exports_record_it(encoder_dir, tmp_path):
    model = tagi("t5", encoder_dir)
    model.to(torch.bfloat16)
    batch = instruction_batch(model, "t5")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    encoder = model.base_model.instruction_encoder
    assert next(encoder.model.parameters()).dtype == torch.float32
    adapter = TaskAdapter.from_instruction(model, word_tokenizer(), "reverse the words")
    folder = adapter.save_lora(tmp_path / "lora")
    assert json.loads((folder / "tagi_adapter.json").read_text())["instruction_encoder"] == encoder_dir
    assert f"`{encoder_dir}`" in (folder / "README.md").read_text()
    assert TaskAdapter.load(folder).instruction_encoder == encoder_dir


def test_each_instruction_is_encoded_once_and_read_back_exactly_in_any_batch(encoder_dir):
    encoder = InstructionEncoder(encoder_dir).load()
    encoded_rows = []
    forward = encoder.model.forward
    encoder.model.forward = lambda input_ids, **kw: encoded_rows.append(len(input_ids)) or forward(input_ids, **kw)
    texts = [INSTRUCTIONS[0], INSTRUCTIONS[1], INSTRUCTIONS[0]]
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    states = encoder(batch["input_ids"], batch["attention_mask"])
    assert encoded_rows == [2]  # the repeated instruction once
    with torch.no_grad():
        direct = forward(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(states[real], direct[real], atol=1e-6) and not states[~real].any()  # padding: zero
    # Read again in another order and padded wider: nothing encoded, the same states to the bit.
    again = encoder.tokenizer([INSTRUCTIONS[1], INSTRUCTIONS[2], INSTRUCTIONS[0]], padding="max_length", max_length=12,
                              return_tensors="pt")  # fmt: skip
    states_again = encoder(again["input_ids"], again["attention_mask"])
    assert encoded_rows == [2, 1]  # only the new one
    length = int(batch["attention_mask"][1].sum())
    assert torch.equal(states_again[0, :length], states[1, :length])
    # A cache too small for one instruction keeps nothing and still gives the right states.
    uncached = InstructionEncoder(encoder_dir).load()
    uncached.cache_limit_bytes = 0
    assert torch.equal(uncached(batch["input_ids"], batch["attention_mask"]), states) and not uncached._cache


def test_read_ahead_encodes_each_instruction_once_under_the_keys_training_batches_look_up(encoder_dir):
    from peft_tagi.data.collator import TagiDataCollator

    encoder = InstructionEncoder(encoder_dir).load()
    widths = []
    forward = encoder.model.forward
    encoder.model.forward = lambda input_ids, **kw: widths.append(tuple(input_ids.shape)) or forward(input_ids, **kw)
    texts = [INSTRUCTIONS[2], INSTRUCTIONS[0], INSTRUCTIONS[2], INSTRUCTIONS[1]]
    assert encoder.read_ahead(texts, max_length=512, batch_size=2) == 3
    assert [rows for rows, _ in widths] == [2, 1] and widths[0][1] <= widths[1][1]  # each once, shortest first
    # A training batch (as the collator tokenizes it) reads all three back: nothing more is encoded.
    collator = TagiDataCollator(word_tokenizer(), instruction_tokenizer=encoder.tokenizer)
    batch = collator([{"task_name": "t", "instruction": t, "input": "cat dog", "output": "dog cat"} for t in texts])
    ids, mask = batch["instruction_input_ids"], batch["instruction_attention_mask"]
    states = encoder(ids, mask)
    assert len(widths) == 2
    with torch.no_grad():
        afresh = forward(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(states[real], afresh[real], atol=1e-6) and not states[~real].any()
    # What does not fit in the cache is left for the batches that need it.
    small = InstructionEncoder(encoder_dir).load()
    shortest = min(len(small.tokenizer(t)["input_ids"]) for t in INSTRUCTIONS)
    kept = len(small._cache)  # the load's own check of two sentences
    small.cache_limit_bytes = small._cache_bytes + shortest * small.hidden_size * 4
    assert small.read_ahead(INSTRUCTIONS) == 1 and len(small._cache) == kept + 1


@pytest.mark.parametrize("steps,reads_ahead", [(1, False), (4, True)])
def test_a_stage_reads_its_instructions_ahead_only_when_it_reads_a_whole_epoch(
    encoder_dir, tmp_path, steps, reads_ahead
):
    import datasets

    from peft_tagi.pipeline import train_stage, training_arguments

    model = tagi("t5", encoder_dir)
    data = datasets.Dataset.from_list(toy_examples())  # 16 examples: 4 steps of 4 are one epoch
    read = []
    model.base_model.instruction_encoder.read_ahead = lambda texts, **kw: read.append((list(texts), kw))
    options = {"per_device_train_batch_size": 4, "use_cpu": True, "lambda_kl": 0.0, "lambda_ins": 0.0}
    train_stage(model, word_tokenizer(), training_arguments(tmp_path / "d", "distill", steps, **options), data)
    assert bool(read) == reads_ahead
    if reads_ahead:
        assert read[0][0] == data["instruction"] and read[0][1] == {"max_length": 512}


@pytest.mark.parametrize("fusion", [True, False])
def test_read_back_states_give_the_same_logits_as_the_encoder_read_afresh(encoder_dir, fusion):
    model = tagi("t5", encoder_dir, instruction_fusion=fusion)
    batch = instruction_batch(model, "t5")
    assert not batch["instruction_attention_mask"].all()  # padded rows: their zero states must not count
    tagi_model = model.base_model
    encoder = tagi_model.instruction_encoder
    with torch.no_grad():
        logits = model(**batch).logits
        tagi_model._encode = lambda ids, mask: encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        afresh = model(**batch).logits
    assert torch.allclose(logits, afresh, atol=1e-5)


def test_the_real_minilm_from_the_encoder_extra():
    if packaged_encoder_path() is None:
        pytest.skip('the real MiniLM comes with the [encoder] extra: pip install -e ".[encoder]"')
    encoder = InstructionEncoder("minilm").load()
    assert encoder.name == "sentence-transformers/all-MiniLM-L6-v2" and encoder.hidden_size == 384
    pooled = encoder.embed(["Reverse the order of the words.", "Flip the sequence around.", "Count the animals."])
    similarity = torch.nn.functional.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    assert similarity[0, 1] > similarity[0, 2]  # a synonym sits closer than another task
    from peft_tagi.tokenizer import unknown_words

    # Words the quickstart's closed vocabulary lacks are ordinary WordPiece tokens for MiniLM.
    assert unknown_words(encoder.tokenizer, "Flip the sequence around, then erase the initial item.") == []


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_an_encoder_gives_the_same_loss_and_gradients(encoder_dir, reentrant):
    results = []
    for checkpointing in (False, True):
        model = tagi("t5", encoder_dir)
        model.train()
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable({"use_reentrant": reentrant})
        batch = instruction_batch(model, "t5")
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert (loss - loss_ckpt).abs() <= 1e-5 and set(grads) == set(grads_ckpt) and grads
    assert all((grads[n] - grads_ckpt[n]).abs().max() <= 1e-5 for n in grads)


def test_quantized_base_with_an_encoder_in_float(encoder_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="no quantized base without bitsandbytes (extra [quant])")
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    base = LlamaForCausalLM.from_pretrained(
        tmp_path / "llama", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    model = get_peft_model(
        base, TagiConfig(task_type="CAUSAL_LM", r=4, hypernetwork_hidden_size=32, instruction_encoder=encoder_dir)
    )
    batch = instruction_batch(model, "llama")
    out = model(**batch)
    out.loss.backward()
    assert (
        torch.isfinite(out.loss)
        and next(model.base_model.instruction_encoder.model.parameters()).dtype == torch.float32
    )
    assert any(p.grad is not None for p in model.base_model.tagi_hypernetwork.parameters())


def test_the_three_stages_train_with_an_encoder(encoder_dir, tmp_path):
    import datasets

    from peft_tagi.data.pretraining import pretraining_dataset
    from peft_tagi.pipeline import train_stage, training_arguments

    model = tagi("t5", encoder_dir)
    tokenizer = word_tokenizer()
    data = datasets.Dataset.from_list(toy_examples())
    options = {"per_device_train_batch_size": 4, "use_cpu": True, "learning_rate": 1e-3}
    train_stage(model, tokenizer, training_arguments(tmp_path / "t", "teachers", 2, **options), data)
    texts = datasets.Dataset.from_dict({"text": ["cat dog sun red blue tree milk fish bird green one word list"] * 8})
    train_stage(
        model, tokenizer, training_arguments(tmp_path / "p", "pretrain", 2, **options), pretraining_dataset(texts)
    )
    before = {n: p.detach().clone() for n, p in model.base_model.tagi_hypernetwork.named_parameters()}
    args = training_arguments(tmp_path / "d", "distill", 2, **options)
    train_stage(model, tokenizer, args, data, teachers=tmp_path / "t" / "teachers")
    after = dict(model.base_model.tagi_hypernetwork.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_encoder_neighbours_assigns_each_phrasing_its_nearest_step_and_splits_scores_by_it(encoder_dir):
    from bench.encoder_neighbours import nearest_steps, split_by_assignment
    from peft_tagi.data.synthetic import PRIMITIVES

    result = nearest_steps(encoder_dir)
    steps = {p.name for p in PRIMITIVES}
    assert set(result["open_vocabulary"]) == steps and result["steps"] == len(steps)
    entries = list(result["open_vocabulary"].items()) + [
        (s, e) for s, rows in result["in_vocabulary"].items() for e in rows
    ]
    for step, entry in entries:
        assert entry["nearest_step"] in steps
        assert entry["right"] == (entry["nearest_step"] == step)
        # The own step's best phrasing is the nearest of all exactly when its margin over every other step is > 0.
        assert entry["right"] == (entry["margin"] > 0) or entry["margin"] == 0
    assert result["open_vocabulary_right"] == sum(e["right"] for e in result["open_vocabulary"].values())

    assignment = {step: {"right": step != "first_two"} for step in steps}
    run = lambda open_, train_: {  # noqa: E731
        "open_vocabulary": {
            "tagi": {"per_task": {t: {"rougeL": v, "exact_match": v / 2} for t, v in open_.items()}},
            "training_wordings": {"per_task": {t: {"rougeL": v, "exact_match": v / 2} for t, v in train_.items()}},
        }
    }
    quality = {"results": [
        run({"first_two_then_count": 10.0, "only_animals_then_drop_first": 40.0}, {"first_two_then_count": 40.0, "only_animals_then_drop_first": 50.0}),
        run({"first_two_then_count": 30.0, "only_animals_then_drop_first": 60.0}, {"first_two_then_count": 40.0, "only_animals_then_drop_first": 50.0}),
        {"seed": 2},  # a run without the report (failed) is left out
    ]}  # fmt: skip
    split = split_by_assignment(quality, assignment)
    assert split["a step assigned wrongly"]["task_runs"] == 2
    assert split["a step assigned wrongly"]["rougeL"] == {
        "open_vocabulary": 20.0,
        "training_wordings": 40.0,
        "fraction": 0.5,
    }
    assert split["both steps assigned rightly"]["exact_match"]["fraction"] == 1.0
