"""The synthetic task suite and the word-level tokenizer: split, paraphrases, determinism, vocabulary, round-trips."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from peft_tagi.data.synthetic import (
    CANONICAL_CONNECTIVES,
    CONNECTIVES,
    EMPTY_OUTPUT,
    EVAL_FAMILIES,
    FREE_WORDING_PHRASINGS,
    FREE_WORDING_TEMPLATES,
    KIND_OF,
    LEXICON,
    OPEN_VOCABULARY_PHRASINGS,
    OPEN_VOCABULARY_TEMPLATES,
    PARTNER_OF,
    PRIMITIVES,
    SyntheticSuite,
    suite_tokenizer,
    synthetic_dataset,
    words_of,
)
from peft_tagi.tokenizer import build_word_tokenizer

KEYS = {"task_name", "instruction", "input", "output", "category", "choices", "references"}


@pytest.fixture(scope="module")
def suite() -> SyntheticSuite:
    return SyntheticSuite(seed=0)


@pytest.fixture(scope="module")
def tokenizer(suite):
    return suite_tokenizer(suite)


def _slots(tasks) -> set[tuple[str, int]]:
    return {(name, position) for task in tasks for position, name in enumerate(task.primitives)}


def test_counts_and_unique_names(suite):
    train, heldout = suite.train_tasks(), suite.heldout_tasks()
    assert len(train) >= 40
    assert len(heldout) >= 10
    names = [t.name for t in train + heldout]
    assert len(names) == len(set(names))
    assert 10 <= len(PRIMITIVES) <= 14
    assert not any(t.heldout for t in train) and all(t.heldout for t in heldout)


@pytest.mark.parametrize("num_train_tasks", [None, 40])
def test_heldout_are_unseen_combinations_of_seen_primitives(num_train_tasks):
    suite = SyntheticSuite(seed=0, num_train_tasks=num_train_tasks)
    train = suite.train_tasks()
    if num_train_tasks is not None:
        assert len(train) == num_train_tasks
    train_pairs = {t.primitives for t in train}
    trained = _slots(train)
    # Every slot a primitive can take in some composition (e.g. "count" is only ever a last step).
    possible = _slots(train + suite.heldout_tasks())
    for task in suite.heldout_tasks():
        assert task.primitives not in train_pairs
        assert task.primitives[0] != task.primitives[1]
        for name in task.primitives:
            for position in (0, 1):
                if (name, position) in possible:
                    assert (name, position) in trained, (task.name, name, position)
    # Every primitive appears in training as first step and as second step, except a terminal one (only last).
    for primitive in PRIMITIVES:
        assert (primitive.name, 1) in trained
        assert ((primitive.name, 0) in trained) != primitive.terminal


def test_split_is_deterministic_and_independent_of_train_size():
    a, b = SyntheticSuite(seed=0), SyntheticSuite(seed=0)
    assert [t.name for t in a.heldout_tasks()] == [t.name for t in b.heldout_tasks()]
    assert [t.name for t in a.train_tasks()] == [t.name for t in b.train_tasks()]
    small = SyntheticSuite(seed=0, num_train_tasks=40)
    assert [t.name for t in small.heldout_tasks()] == [t.name for t in a.heldout_tasks()]
    assert {t.name for t in small.train_tasks()} <= {t.name for t in a.train_tasks()}
    other = SyntheticSuite(seed=1)
    assert [t.name for t in other.heldout_tasks()] != [t.name for t in a.heldout_tasks()]
    with pytest.raises(ValueError):
        SyntheticSuite(seed=0, num_train_tasks=3)


def test_paraphrases_and_eval_only_family(suite):
    eval_only = set()
    train_words = set()
    for task in suite.train_tasks():
        paraphrases = task.instructions(train=True)
        assert len(set(paraphrases)) >= 3
        train_words |= {w for text in paraphrases for w in words_of(text)}
        with pytest.raises(ValueError):
            task.instructions(train=False)
    for task in suite.heldout_tasks():
        assert len(set(task.instructions(train=True))) >= 3
        held = task.instructions(train=False)
        assert held and not set(held) & set(task.instructions(train=True))
        eval_only |= set(held)
    # The evaluation-only family never reaches a training example, in either split.
    for split in ("train", "eval"):
        rows = suite.examples(suite.train_tasks(), 4, split=split, seed=0)
        assert not {r["instruction"] for r in rows} & eval_only
    assert not {r["instruction"] for r in suite.examples(suite.heldout_tasks(), 4, "train")} & eval_only
    # Held-out evaluation data uses the three families in turn, and they introduce no word the training
    # instructions lack.
    rows = suite.examples(suite.heldout_tasks(), 6, "eval")
    assert {r["instruction"] for r in rows} <= eval_only
    for task in suite.heldout_tasks():
        families = task.instructions(train=False)
        assert len(families) == len(EVAL_FAMILIES) == len(set(families)) == 3
        assert [r["instruction"] for r in rows if r["task_name"] == task.name] == families * 2
    assert {w for text in eval_only for w in words_of(text)} <= train_words
    # No training connective is an evaluation-only family's structure; every connective reaches training, and the
    # canonical wordings (the training-wording reference) are the aligned ones of the first connectives.
    assert not set(CONNECTIVES) & set(EVAL_FAMILIES)
    task = suite.train_tasks()[0]
    first, second = task.steps
    rows = suite.examples([task], 200, "train", seed=0)
    for template in CONNECTIVES:
        pattern = re.compile(re.sub(r"\\{[aAbB]\\}", "[a-z ]+", re.escape(template)) + "$", re.IGNORECASE)
        assert any(pattern.match(r["instruction"]) for r in rows), template
    assert task.canonical_instructions() == task.instructions(train=True)[:CANONICAL_CONNECTIVES]
    assert task.canonical_instructions()[0] == CONNECTIVES[0].format(a=first.phrasings[0], b=second.phrasings[0])
    # Each family has its own phrasing of every step, none of them a training phrasing.
    for primitive in suite.primitives:
        assert len(set(primitive.eval_phrasings)) == 3 and not set(primitive.eval_phrasings) & set(primitive.phrasings)


def test_examples_format_determinism_and_vocabulary(suite):
    tasks = suite.train_tasks()[:5] + suite.heldout_tasks()[:5]
    rows = suite.examples(tasks, 8, split="train", seed=3)
    assert len(rows) == 80
    assert rows == suite.examples(tasks, 8, split="train", seed=3)
    assert rows != suite.examples(tasks, 8, split="train", seed=4)
    assert rows[:8] == suite.examples(tasks[:1], 8, "train", seed=3)  # independent of the other tasks
    assert suite.examples(tasks[:1], 3, "train", seed=3) == rows[:3]  # a prefix: independent of num_instances
    assert SyntheticSuite(seed=0).examples(tasks, 8, "train", seed=3) == rows
    vocab = set(suite.vocabulary())
    all_rows = suite.examples(suite.train_tasks(), 3, "train") + suite.examples(suite.heldout_tasks(), 3, "eval")
    for row in all_rows:
        assert set(row) == KEYS
        assert row["output"].strip() and row["references"] == [row["output"]] and row["choices"] == []
        assert row["category"] == suite.task(row["task_name"]).primitives[0]
        words = row["input"].split()
        assert 3 <= len(words) <= 7 and len(set(words)) == len(words) and set(words) <= set(LEXICON)
        for field in ("instruction", "input", "output"):
            assert set(words_of(row[field])) <= vocab, (field, row[field])
    for text in suite.pretraining_texts(50, seed=0):
        assert set(words_of(text)) <= vocab
    assert suite.pretraining_texts(5, seed=0) == suite.pretraining_texts(5, seed=0)
    assert suite.pretraining_texts(5, seed=0) != suite.pretraining_texts(5, seed=1)
    assert len(vocab) == len(suite.vocabulary())


def test_pretraining_texts_do_not_leak_heldout(suite):
    texts = " ".join(suite.pretraining_texts(300, seed=0))
    for task in suite.heldout_tasks():
        for instruction in task.instructions(train=False) + task.instructions(train=True):
            assert instruction not in texts


def test_hand_checked_compositions(suite):
    def run(first: str, second: str, text: str) -> str:
        return suite.compose(first, second).apply(text.split())

    words = "cat sun red tree milk"
    assert run("reverse", "first_two", words) == "milk tree"
    assert run("reverse", "last_two", words) == "sun cat"
    assert run("drop_first", "swap_ends", words) == "milk red tree sun"
    assert run("rotate", "drop_last", words) == "sun red tree milk"
    assert run("partner", "reverse", words) == "tea rock blue moon dog"
    assert run("double", "count", words) == "ten"
    assert run("kind", "first_two", words) == "animal thing"
    assert run("only_animals", "double", words) == "cat cat"
    assert run("only_animals", "partner", "sun red") == EMPTY_OUTPUT
    assert run("only_animals", "count", "sun red") == "zero"
    assert run("first_two", "swap_ends", "dog") == "dog"
    with pytest.raises(ValueError):
        suite.compose("count", "reverse")
    with pytest.raises(ValueError):
        suite.compose("kind", "partner")
    assert suite.compose(*suite.heldout_tasks()[0].primitives).heldout
    assert all(PARTNER_OF[PARTNER_OF[w]] == w and KIND_OF[PARTNER_OF[w]] == KIND_OF[w] for w in LEXICON)
    # Outputs are correct in generated examples too.
    for row in suite.examples(suite.train_tasks(), 2, "train"):
        assert suite.task(row["task_name"]).apply(row["input"].split()) == row["output"]


def test_synthetic_dataset():
    suite = SyntheticSuite(seed=0, num_train_tasks=40)
    ds = synthetic_dataset("heldout", num_instances=2, suite=suite)
    assert len(ds) == 2 * len(suite.heldout_tasks())
    assert set(ds.column_names) == KEYS
    assert ds[0]["choices"] == [] and ds[0]["references"] == [ds[0]["output"]]
    assert ds[0]["instruction"] in suite.task(ds[0]["task_name"]).instructions(train=False)
    assert len(synthetic_dataset("train", num_instances=1, suite=suite)) == 40


def test_tokenizer_round_trip(tmp_path, suite, tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == len(suite.vocabulary()) + 3
    rows = suite.examples(suite.train_tasks()[:10], 2, "train") + suite.examples(suite.heldout_tasks(), 2, "eval")
    texts = [r[f] for r in rows for f in ("instruction", "input", "output")] + suite.pretraining_texts(20)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert not (encoded.input_ids == tokenizer.unk_token_id).any()
    assert encoded.input_ids.shape == encoded.attention_mask.shape
    lengths = encoded.attention_mask.sum(-1)
    for row, length in zip(encoded.input_ids, lengths):
        assert row[length - 1] == tokenizer.eos_token_id and (row[length:] == tokenizer.pad_token_id).all()
    decoded = tokenizer.batch_decode(encoded.input_ids, skip_special_tokens=True)
    for text, back in zip(texts, decoded):
        assert back.split() == text.lower().split() or words_of(back) == words_of(text)
    data = [r["input"] for r in rows] + [r["output"] for r in rows]
    assert tokenizer.batch_decode(tokenizer(data).input_ids, skip_special_tokens=True) == data
    assert tokenizer.decode(tokenizer("First reverse the words.").input_ids, skip_special_tokens=True) == (
        "first reverse the words."
    )
    # One token per word: sequences stay short.
    assert len(tokenizer("cat sun red").input_ids) == 4

    tokenizer.save_pretrained(tmp_path)
    for loader in (PreTrainedTokenizerFast, AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path)
        assert loaded(texts).input_ids == tokenizer(texts).input_ids
        assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
        assert loaded.batch_decode(loaded(data).input_ids, skip_special_tokens=True) == data


def test_build_word_tokenizer_unknown_and_duplicates():
    tok = build_word_tokenizer(["Cat", "cat", "sun", "<pad>", "."], model_max_length=16)
    assert len(tok) == 6 and tok.model_max_length == 16
    ids = tok("cat zebra sun.").input_ids
    assert ids == [3, 2, 4, 5, 1]
    assert tok.decode(ids, skip_special_tokens=True) == "cat sun."
    with pytest.raises(ValueError):
        build_word_tokenizer(["two words"])


def test_instruction_swap_examples_ask_for_the_given_task():
    suite = SyntheticSuite(seed=0)
    tasks = suite.heldout_tasks()[:3]
    examples = suite.examples(tasks, 2, split="eval", seed=1)
    swapped = suite.instruction_swap_examples(examples)
    assert len(swapped) == len(examples)
    for original, row in zip(examples, swapped):
        given = tasks[(tasks.index(suite.task(original["task_name"])) + 1) % len(tasks)]
        assert row["given_task"] == given.name and row["input"] == original["input"]
        assert row["instruction"] in given.instructions(train=False)
        assert row["references"] == [given.apply(original["input"].split())]
        assert row["own_references"] == original["references"]


def _join(template: str, a: str, b: str) -> str:
    return template.format(a=a, b=b, A=a[:1].upper() + a[1:], B=b[:1].upper() + b[1:])


def test_step_order_examples_ask_for_the_steps_the_other_way_round():
    suite = SyntheticSuite(seed=0)
    heldout = suite.examples(suite.heldout_tasks(), 30, split="eval", seed=1)
    swapped = suite.step_order_examples(heldout)
    assert 0 < len(swapped) < len(heldout)
    training_wordings = {i for t in suite.train_tasks() for i in t.instructions(train=True)}
    for row in swapped:
        task = suite.task(row["task_name"])
        first, second = task.steps
        words = row["input"].split()
        reordered = suite.compose(second.name, first.name)
        assert row["given_task"] == reordered.name and row["references"] == [reordered.apply(words)]
        assert row["own_references"] == [task.apply(words)] != row["references"]  # the two orders differ here
        # The example's own evaluation-only family, with the steps exchanged: never a training wording.
        k = int(suite.paraphrase_family({**row, "instruction": row["own_instruction"]}).split(":")[0]) - 1
        assert row["instruction"] == _join(EVAL_FAMILIES[k], second.eval_phrasings[k], first.eval_phrasings[k])
        assert row["instruction"] not in training_wordings
    # Tasks whose steps cannot run the other way round ("count" first, "kind" before a step that needs the lexicon)
    # are left out, as are inputs on which both orders give the same answer.
    kept = {row["task_name"] for row in swapped}
    for task in suite.heldout_tasks():
        first, second = task.steps
        if second.terminal or (second.leaves_lexicon and first.needs_lexicon):
            assert task.name not in kept
    # Training tasks (validation runs) keep their canonical connective, steps exchanged.
    training = suite.examples(suite.train_tasks()[:4], 3, split="eval", seed=1)
    for row in suite.step_order_examples(training):
        first, second = suite.task(row["task_name"]).steps
        k = suite.task(row["task_name"]).canonical_instructions().index(row["own_instruction"])
        expected = _join(
            CONNECTIVES[k], second.phrasings[k % len(second.phrasings)], first.phrasings[k % len(first.phrasings)]
        )
        assert row["instruction"] == expected


def test_shuffled_instruction_examples_keep_the_words_not_the_sentence():
    suite = SyntheticSuite(seed=0)
    examples = suite.examples(suite.heldout_tasks()[:3], 6, split="eval", seed=1)
    shuffled = suite.shuffled_instruction_examples(examples, seed=0)
    assert shuffled == suite.shuffled_instruction_examples(examples, seed=0)  # deterministic
    for original, row in zip(examples, shuffled):
        words = [w for w in words_of(original["instruction"]) if w[0].isalnum()]
        assert sorted(words_of(row["instruction"])[:-1]) == sorted(words) and row["instruction"].endswith(".")
        assert row["instruction"] != original["instruction"]
        assert {k: v for k, v in row.items() if k != "instruction"} == {
            k: v for k, v in original.items() if k != "instruction"
        }
    # One order per instruction: every example of an instruction reads the same shuffled text.
    by_instruction = {}
    for original, row in zip(examples, shuffled):
        assert by_instruction.setdefault(original["instruction"], row["instruction"]) == row["instruction"]


def test_free_wordings_leave_the_open_vocabulary_family_unseen_and_keep_the_teachers_wording():
    suite = SyntheticSuite(seed=0)
    vocabulary = set(suite.vocabulary())

    def new_words(texts) -> set[str]:
        return {w for text in texts for w in words_of(re.sub(r"\{\w+\}", " ", text)) if w not in vocabulary}

    free = [p for phrasings in FREE_WORDING_PHRASINGS.values() for p in phrasings] + list(FREE_WORDING_TEMPLATES)
    evaluation = list(OPEN_VOCABULARY_PHRASINGS.values()) + list(OPEN_VOCABULARY_TEMPLATES)
    assert set(FREE_WORDING_PHRASINGS) == {p.name for p in PRIMITIVES}
    assert new_words(free), "free wordings in the suite's own words would teach nothing new"
    # No word outside the suite's vocabulary is shared: the open-vocabulary evaluation family stays unseen.
    assert not new_words(free) & new_words(evaluation)
    assert not new_words(free) & vocabulary  # and the word tokenizer's vocabulary does not grow

    examples = suite.examples(suite.train_tasks()[:6], 20, split="train", seed=0)
    reworded = suite.free_wording_examples(examples, 0.5, seed=0)
    assert reworded == suite.free_wording_examples(examples, 0.5, seed=0)  # deterministic
    changed = [r for e, r in zip(examples, reworded) if r["instruction"] != e["instruction"]]
    assert 0.3 * len(examples) < len(changed) < 0.7 * len(examples)
    for original, row in zip(examples, reworded):
        assert row["teacher_instruction"] == original["instruction"]
        assert {k: v for k, v in row.items() if k not in ("instruction", "teacher_instruction")} == {
            k: v for k, v in original.items() if k != "instruction"
        }
        if row["instruction"] != original["instruction"]:
            first, second = suite.task(row["task_name"]).steps
            a, b = (FREE_WORDING_PHRASINGS[s.name] for s in (first, second))
            assert any(
                row["instruction"] == t.format(a=x, b=y, A=x[:1].upper() + x[1:], B=y[:1].upper() + y[1:])
                for t in FREE_WORDING_TEMPLATES for x in a for y in b
            )  # fmt: skip
    assert [r["instruction"] for r in suite.free_wording_examples(examples, 0.0)] == [
        e["instruction"] for e in examples
    ]
    assert all(
        r["instruction"] != e["instruction"] for r, e in zip(suite.free_wording_examples(examples, 1.0), examples)
    )
    with pytest.raises(ValueError, match="fraction"):
        suite.free_wording_examples(examples, 1.5)
    # `variety` draws from the first phrasings and templates only; the default draws from all of them.
    few = {r["instruction"] for r in suite.free_wording_examples(examples, 1.0, variety=1)}
    assert all(FREE_WORDING_PHRASINGS[suite.task(r["task_name"]).steps[0].name][0] in r["instruction"].lower()
               for r in suite.free_wording_examples(examples, 1.0, variety=1))  # fmt: skip
    assert len(few) == len({e["task_name"] for e in examples})  # one wording per task
    every = suite.free_wording_examples(examples, 1.0)
    assert any(
        all(p not in r["instruction"].lower() for p in FREE_WORDING_PHRASINGS[suite.task(r["task_name"]).steps[0].name][:3])
        for r in every
    )  # fmt: skip
    with pytest.raises(ValueError, match="variety"):
        suite.free_wording_examples(examples, 0.5, variety=len(FREE_WORDING_TEMPLATES) + 1)
