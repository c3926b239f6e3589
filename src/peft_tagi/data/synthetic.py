"""A synthetic suite of word-list tasks for quick, meaningful TAGI runs on a CPU.

Every task chains two *primitives* (small operations on a short list of words, such as "reverse the order of the
words" or "replace every word with its partner") and is described by an instruction written the way a person would
write it: "First reverse the order of the words, then keep only the first two words."

The suite is built to answer one question in minutes: does a generated adapter carry the meaning of an instruction
to a task never trained on? Hence:

- Held-out tasks are *unseen combinations of seen skills*: both primitives of every held-out task appear in training
  tasks, as first step and as second step wherever the primitive can take that position (checked on construction).
- Three paraphrase families are evaluation-only (`EVAL_FAMILIES`: each its own sentence structure and its own
  phrasing of every step): their instructions are never given for training tasks or in training examples, so a
  held-out score also measures robustness to new wording, family by family. They introduce no new word (they
  recombine words of the training instructions), because a word-level model cannot know a word it never saw.
- The vocabulary is closed (`SyntheticSuite.vocabulary`), so a word-level tokenizer (`suite_tokenizer`) covers every
  text without `<unk>`, and a small T5 trained from scratch learns fast (see `peft_tagi.tokenizer`).
- Everything is deterministic for a seed: the split depends only on the suite seed (never on how many instances
  are drawn), and examples depend only on (suite seed, example seed, split, task).

Outputs are never empty: a list emptied by a filter is written "none", and counting an empty list gives "zero".
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..tokenizer import build_word_tokenizer

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Lexicon: four kinds of eight words; every word has a partner of the same kind (so that filtering by kind and
# replacing by partner commute, and no step leaves the lexicon except "kind" and "count").
# ----------------------------------------------------------------------------------------------------------------
PARTNERS: dict[str, tuple[tuple[str, str], ...]] = {
    "animal": (("cat", "dog"), ("cow", "pig"), ("fox", "owl"), ("hen", "bee")),
    "color": (("red", "blue"), ("green", "pink"), ("black", "white"), ("gray", "gold")),
    "food": (("apple", "pear"), ("bread", "rice"), ("milk", "tea"), ("egg", "cake")),
    "thing": (("sun", "moon"), ("tree", "rock"), ("cup", "box"), ("car", "hat")),
}
KIND_OF: dict[str, str] = {word: kind for kind, pairs in PARTNERS.items() for pair in pairs for word in pair}
PARTNER_OF: dict[str, str] = {
    word: other for pairs in PARTNERS.values() for a, b in pairs for word, other in ((a, b), (b, a))
}
LEXICON: tuple[str, ...] = tuple(KIND_OF)
KINDS: tuple[str, ...] = tuple(PARTNERS)
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven",
    "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen",
)  # fmt: skip
EMPTY_OUTPUT = "none"
MIN_INPUT_WORDS = 3
MAX_INPUT_WORDS = 7
# Words a collator may put around instruction and input ("Instruction: ... Input: ..."): part of the closed
# vocabulary so that such formats stay free of <unk>.
FORMAT_WORDS: tuple[str, ...] = ("instruction", "input", "output", ":")

Split = Literal["train", "eval"]
# Prints `SyntheticSuite().vocabulary()`; named by the unknown-word warnings of tokenizers made by `suite_tokenizer`.
VOCABULARY_COMMAND = "peft-tagi quickstart --show-vocabulary"


def words_of(text: str) -> list[str]:
    """Tokens of `text` as the word-level tokenizer sees them: lowercased words and single punctuation marks."""
    return re.findall(r"[^\W_]+|[^\w\s]|_", text.lower())


# ----------------------------------------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Primitive:
    """One skill: a function on a list of words and the ways a person would ask for it.

    Attributes:
        name: identifier used in task names ("reverse", "first_two", ...).
        fn: the operation, list of words -> list of words (may be empty; rendered as "none").
        phrasings: training phrasings (imperative verb phrases, lowercase, no final punctuation).
        eval_phrasings: one phrasing per evaluation-only family (`EVAL_FAMILIES`, same order), none of them a
            training phrasing; made of words that appear in the training instructions, so a word-level model has
            seen every one of them.
        terminal: the result is not a list of lexicon words (e.g. a count), so nothing may follow this step.
        needs_lexicon: the step is only defined on lexicon words (it may not follow a step that leaves the lexicon).
        leaves_lexicon: the result holds words outside the lexicon (kind names).
    """

    name: str
    fn: Callable[[list[str]], list[str]] = field(repr=False, compare=False)
    phrasings: tuple[str, ...]
    eval_phrasings: tuple[str, str, str]
    terminal: bool = False
    needs_lexicon: bool = False
    leaves_lexicon: bool = False


def _count(words: list[str]) -> list[str]:
    return [NUMBER_WORDS[len(words)]]


# The primitives were chosen so that a small T5 learns each of them in minutes from word-level tokens: positional
# selections and word-by-word maps, no sorting (a calibration run, a T5 of d_model 128 trained for 7 minutes on 2
# cores, found sorting much harder than the others).
PRIMITIVES: tuple[Primitive, ...] = (
    Primitive(
        "reverse",
        lambda w: w[::-1],
        ("reverse the order of the words", "reverse the words", "write the words in reverse order"),
        ("put the words in reverse order", "write the list in reverse order", "reverse the order of the list"),
    ),
    Primitive(
        "first_two",
        lambda w: w[:2],
        ("keep only the first two words", "keep the first two words", "take the first two words"),
        ("only keep the first two words", "take only the first two words", "keep the two words at the start"),
    ),
    Primitive(
        "last_two",
        lambda w: w[-2:],
        ("keep only the last two words", "keep the last two words", "take the last two words"),
        ("only keep the last two words", "take only the last two words", "keep the two words at the end"),
    ),
    Primitive(
        "drop_first",
        lambda w: w[1:],
        ("remove the first word", "drop the first word", "delete the first word"),
        ("remove the word at the start", "drop the word at the start", "delete the first word of the list"),
    ),
    Primitive(
        "drop_last",
        lambda w: w[:-1],
        ("remove the last word", "drop the last word", "delete the last word"),
        ("remove the word at the end", "drop the word at the end", "delete the last word of the list"),
    ),
    Primitive(
        "swap_ends",
        lambda w: w[-1:] + w[1:-1] + w[:1] if len(w) > 1 else list(w),
        (
            "swap the first and the last word",
            "exchange the first word and the last word",
            "switch the first and last words",
        ),
        (
            "swap the first word and the last word",
            "exchange the first and the last word",
            "switch the word at the start and the word at the end",
        ),
    ),
    Primitive(
        "rotate",
        lambda w: w[1:] + w[:1],
        ("move the first word to the end", "put the first word at the end", "move the word at the start to the end"),
        (
            "put the first word at the end of the list",
            "move the first word to the end of the list",
            "move the word at the start to the end of the list",
        ),
    ),
    Primitive(
        "double",
        lambda w: [x for x in w for _ in range(2)],
        ("write every word twice", "repeat each word twice", "say each word two times"),
        ("write each word two times", "repeat every word two times", "say every word twice"),
    ),
    Primitive(
        "partner",
        lambda w: [PARTNER_OF[x] for x in w],
        (
            "replace every word with its partner",
            "swap each word for its partner",
            "change every word into its partner",
        ),
        ("replace each word with its partner", "change each word into its partner", "write the partner of every word"),
        needs_lexicon=True,
    ),
    Primitive(
        "kind",
        lambda w: [KIND_OF[x] for x in w],
        ("replace every word with its kind", "change each word into its kind", "write the kind of every word"),
        ("write the kind of each word", "replace each word with its kind", "say the kind of every word"),
        needs_lexicon=True,
        leaves_lexicon=True,
    ),
    Primitive(
        "only_animals",
        lambda w: [x for x in w if KIND_OF[x] == "animal"],
        (
            "keep only the animals",
            "remove every word that is not an animal",
            "keep the animals and drop the other words",
        ),
        (
            "only keep the animals",
            "drop every word that is not an animal",
            "remove the other words and keep the animals",
        ),
        needs_lexicon=True,
    ),
    Primitive(
        "count",
        _count,
        ("count the words", "say how many words there are", "write the number of words"),
        ("count how many words there are", "say the number of words", "write how many words there are"),
        terminal=True,
    ),
)

# Connectives join two phrasings ({a}: first step, {b}: second step; {A} is {a} capitalised). The order of the
# steps in the sentence is always the order of execution, so no connective asks the model to invert it. The first
# three are one sentence each; the last three (added when the bare-sentence evaluation family scored 28 ROUGE-L
# against 35.9 and 34.4 for the others, bench/results/wording_before_widening.json) split the steps over sentences
# in ways no evaluation-only family does, so that "one step per sentence" is a structure the model has seen.
CONNECTIVES: tuple[str, ...] = (
    "First {a}, then {b}.",
    "{A}, and then {b}.",
    "Take the list of words, {a}, and after that {b}.",
    "{A}. Next, {b}.",
    "Step one: {a}. Step two: {b}.",
    "Start with the list of words. {A}, and then {b}.",
)
# The canonical training wordings (one per task per connective) use the first three connectives only, so that the
# training-wording reference of the wording report stays the same when connectives are added.
CANONICAL_CONNECTIVES = 3
# The evaluation-only families: family k joins the steps' `eval_phrasings[k]` with `EVAL_FAMILIES[k]`. Each has a
# structure no training connective has (two sentences; a lead-in sentence and "then"; three bare sentences), still
# in execution order.
EVAL_FAMILIES: tuple[str, ...] = (
    "First {a}. After that, {b}.",
    "Take the words and {a}. Then {b}.",
    "Take the list of words. {A}. {B}.",
)

# An evaluation-only family in words the suite's vocabulary does not have: synonyms of every step and sentence
# structures no other wording uses, as a user would word a task without knowing the suite. Only a model that reads the
# instruction with a pretrained encoder (`TagiConfig.instruction_encoder`) can know these words; the quickstart's
# word tokenizer reads most of them as <unk>. Never used for training.
OPEN_VOCABULARY_PHRASINGS: dict[str, str] = {
    "reverse": "flip the sequence around",
    "first_two": "retain merely the opening pair of items",
    "last_two": "retain merely the closing pair of items",
    "drop_first": "erase the opening item",
    "drop_last": "erase the closing item",
    "swap_ends": "trade places between the opening item and the closing item",
    "rotate": "shift the opening item to the back",
    "double": "duplicate each item",
    "partner": "substitute each item with its counterpart",
    "kind": "substitute each item with its category",
    "only_animals": "retain merely the creatures",
    "count": "tally the items",
}
OPEN_VOCABULARY_TEMPLATES: tuple[str, ...] = ("To start, {a}; afterwards, {b}.", "{A}. Once that is done, {b}.")

# Training wordings in words outside the suite's vocabulary, for a model that reads its instructions with a pretrained
# encoder (`QuickstartConfig.free_wordings`): with only the suite's wordings, the hypernetwork learns one small region
# of the encoder's space per step; these show it that other words for a step mean the same adapter, as Text-to-LoRA
# trains on several descriptions per task. They share no word outside the suite's vocabulary with the
# open-vocabulary evaluation family above (tests/test_synthetic.py checks), so that family stays unseen; the word
# tokenizer never reads them (the teacher keeps reading the original wording, `teacher_instruction`).
FREE_WORDING_PHRASINGS: dict[str, tuple[str, ...]] = {
    "reverse": (
        "invert the ordering of the tokens",
        "turn the list backwards",
        "present the entries from last to first",
        "mirror the arrangement of the entries",
        "go through the tokens from the end to the beginning",
        "write the list in opposite order",
        "arrange the elements in backward order",
        "read the members off from the tail to the head",
        "reorder the terms so the final one leads",
        "invert the list",
        "put the pieces in the opposite arrangement",
        "list the units starting from the rear",
    ),
    "first_two": (
        "hold on to just the initial two tokens",
        "preserve solely the two leading entries",
        "output nothing except the earliest two entries",
        "truncate the list after its second token",
        "select the front two entries",
        "give the beginning two tokens alone",
        "preserve the leading couple of elements",
        "cut the list down to its front couple",
        "output the two members at the head",
        "discard all but the initial two terms",
        "hold the earliest couple of pieces and nothing more",
        "leave just the two units at the beginning",
    ),
    "last_two": (
        "hold on to just the final two tokens",
        "preserve solely the two trailing entries",
        "output nothing except the latest two entries",
        "cut away everything before the second to last token",
        "select the rear two entries",
        "give the ending two tokens alone",
        "preserve the trailing couple of elements",
        "cut the list down to its rear couple",
        "output the two members at the tail",
        "discard all but the final two terms",
        "hold the latest couple of pieces and nothing more",
        "leave just the two units at the finish",
    ),
    "drop_first": (
        "get rid of the initial token",
        "discard the leading entry",
        "omit the earliest entry",
        "skip the front entry",
        "throw away the beginning token",
        "leave out the entry at the front",
        "delete the leading element",
        "cut off the head of the list",
        "strip the initial member",
        "eliminate the front term",
        "chop the earliest piece",
        "lose the unit at the beginning",
    ),
    "drop_last": (
        "get rid of the final token",
        "discard the trailing entry",
        "omit the latest entry",
        "skip the rear entry",
        "throw away the ending token",
        "leave out the entry at the end",
        "delete the trailing element",
        "cut off the tail of the list",
        "strip the final member",
        "eliminate the rear term",
        "chop the latest piece",
        "lose the unit at the finish",
    ),
    "swap_ends": (
        "interchange the initial token and the final token",
        "let the leading and trailing entries change positions",
        "exchange the positions of the earliest and latest entries",
        "switch the front entry with the rear entry",
        "put the final token in front and the initial token at the end",
        "make the outermost two entries change seats",
        "exchange the positions of the head and the tail",
        "make the leading element and the trailing element switch spots",
        "interchange the outermost members",
        "let the front term and the rear term change positions",
        "reposition the initial piece at the finish and the final piece at the beginning",
        "switch the extreme units of the list",
    ),
    "rotate": (
        "relocate the initial token to the tail",
        "send the leading entry to the rear",
        "transfer the earliest entry so it comes last",
        "cycle the list left by one position",
        "take the front entry and append it at the end",
        "let the beginning token join the list at its tail",
        "transfer the leading element to the rear",
        "take the head of the list and append it to the tail",
        "cycle the members by one step",
        "relocate the front term behind all the others",
        "make the initial piece the final piece",
        "send the unit at the beginning to the finish",
    ),
    "double": (
        "output every token two times in a row",
        "echo each entry",
        "produce two copies of every entry",
        "write each token followed by a copy of itself",
        "say every entry twice in a row",
        "repeat each token one more time",
        "twin every element",
        "emit each member two times consecutively",
        "follow every term by an identical copy",
        "copy each piece so it shows up two times",
        "produce every unit twice in succession",
        "give a double of each element",
    ),
    "partner": (
        "map every token to its mate",
        "turn every entry into its companion",
        "give the matching twin of each entry",
        "convert each token to the word associated with it",
        "replace every entry by its mate",
        "name the companion of every token",
        "map each element to its associate",
        "exchange every member for the word it is matched with",
        "give the linked word of each term",
        "write the buddy of every piece",
        "convert every unit into the one it goes with",
        "name the associate of each element",
    ),
    "kind": (
        "turn each token into its type",
        "give the class of every entry",
        "label each entry by its group",
        "classify every token",
        "name the family every entry belongs to",
        "write what sort of thing each token is",
        "give the group of each element",
        "tell the class each member belongs to",
        "label every term with its type",
        "write the family of every piece",
        "categorize each unit",
        "state what sort each element is",
    ),
    "only_animals": (
        "hold on to just the beasts",
        "discard everything that is not a living being",
        "filter the list down to fauna",
        "select the animal entries alone",
        "throw away all entries except the critters",
        "leave nothing but the zoological tokens",
        "preserve just the living beings",
        "filter the elements down to the beasts",
        "discard every member that is not fauna",
        "hold the critters and lose the others",
        "select the zoological terms only",
        "leave just the pieces that are beasts",
    ),
    "count": (
        "report how many tokens are present",
        "give the total number of entries",
        "compute the length of the list",
        "say how many entries there are",
        "measure the size of the list",
        "output the quantity of tokens",
        "give the length of the list",
        "compute how many elements there are",
        "state the total of the members",
        "report the quantity of terms",
        "measure how long the list is",
        "output the size of the collection",
    ),
}
FREE_WORDING_TEMPLATES: tuple[str, ...] = (
    "Begin with this: {a}. Subsequently, {b}.",
    "{A}, and when finished, {b}.",
    "Do these in order: {a}, {b}.",
    "Initially, {a}. Following this, {b}.",
    "Your job is two operations. Operation one: {a}. Operation two: {b}.",
    "{A}, and as a second operation, {b}.",
    "First of all, {a}. Later, {b}.",
    "{A}, followed by: {b}.",
    "Two operations in a row: {a}, and {b}.",
    "Before anything else, {a}. Subsequently, {b}.",
    "Perform this: {a}. Perform this next: {b}.",
    "{A}. With that finished, {b}.",
)

# Plain-text sentences about the lexicon, for pretraining the small base model and the hypernetwork on text.
_FACT_TEMPLATES: tuple[str, ...] = (
    "{w} is {ak}.",
    "the partner of {w} is {p}.",
    "the kind of {w} is {k}.",
    "{w} and {p} are partners.",
)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _connect(template: str, a: str, b: str) -> str:
    return template.format(a=a, b=b, A=_capitalise(a), B=_capitalise(b))


def render_output(words: Sequence[str]) -> str:
    """Write a list of words as a target string ("none" for an empty list)."""
    return " ".join(words) if words else EMPTY_OUTPUT


# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticTask:
    """An ordered composition of two primitives.

    Attributes:
        name: "<first>_then_<second>", e.g. "reverse_then_first_two".
        primitives: the names of the two steps, in execution order.
        heldout: whether the task belongs to the held-out split.
        steps: the two `Primitive` objects, in execution order.
    """

    name: str
    primitives: tuple[str, str]
    heldout: bool
    steps: tuple[Primitive, Primitive] = field(repr=False, compare=False)

    def instructions(self, train: bool = True) -> list[str]:
        """Paraphrases of the task instruction.

        Args:
            train: True for the training paraphrases (every training connective with every training phrasing of
                each step; the first entry is the canonical one); False for the evaluation-only families, which
                only held-out tasks have: one instruction per family, in the order of `EVAL_FAMILIES`.
        """
        first, second = self.steps
        if not train:
            if not self.heldout:
                raise ValueError(
                    f"Task {self.name!r} is a training task: the evaluation-only paraphrases are reserved for "
                    "held-out tasks so that they never reach training."
                )
            return [
                _connect(template, a, b)
                for template, a, b in zip(EVAL_FAMILIES, first.eval_phrasings, second.eval_phrasings, strict=True)
            ]
        # Aligned families first (connective i with phrasing i of both steps), then every mixed combination.
        aligned = [
            _connect(template, first.phrasings[i % len(first.phrasings)], second.phrasings[i % len(second.phrasings)])
            for i, template in enumerate(CONNECTIVES)
        ]
        mixed = [
            _connect(template, a, b) for template in CONNECTIVES for a in first.phrasings for b in second.phrasings
        ]
        return list(dict.fromkeys(aligned + mixed))

    def canonical_instructions(self) -> list[str]:
        """The canonical training wordings, one per canonical connective (`CANONICAL_CONNECTIVES`): the evaluation
        wordings of a training task, and the training-wording reference of a held-out one."""
        return self.instructions(train=True)[:CANONICAL_CONNECTIVES]

    def apply(self, words: Sequence[str]) -> str:
        """The target output for the input `words` (a list of lexicon words)."""
        result = list(words)
        for step in self.steps:
            result = step.fn(result)
        return render_output(result)


def _valid_pair(first: Primitive, second: Primitive) -> bool:
    if first.name == second.name or first.terminal:
        return False
    if first.leaves_lexicon and second.needs_lexicon:
        return False
    return True


def _coverage_slots(pairs: Iterable[tuple[Primitive, Primitive]]) -> set[tuple[str, int]]:
    """(primitive name, position) for every position a primitive takes in `pairs`."""
    return {(p.name, position) for pair in pairs for position, p in enumerate(pair)}


class SyntheticSuite:
    """The synthetic task suite: primitives, a fixed train / held-out split of their compositions, and examples.

    Args:
        seed: fixes the held-out split (and the subset of training tasks when `num_train_tasks` is set). Nothing
            else changes the split.
        num_train_tasks: how many training tasks to keep (None: every valid composition that is not held out). The
            subset always covers every primitive in every position it can take.
        num_heldout_tasks: how many compositions to hold out.
        primitives: the primitives to compose (default: `PRIMITIVES`).

    Example:
        ```python
        >>> suite = SyntheticSuite(seed=0)
        >>> train = suite.examples(suite.train_tasks(), num_instances=64, split="train", seed=0)
        >>> heldout = suite.examples(suite.heldout_tasks(), num_instances=32, split="eval", seed=0)
        >>> tokenizer = suite_tokenizer(suite)
        ```
    """

    def __init__(
        self,
        seed: int = 0,
        num_train_tasks: int | None = None,
        num_heldout_tasks: int = 12,
        primitives: Sequence[Primitive] = PRIMITIVES,
    ) -> None:
        self.seed = seed
        self.primitives: tuple[Primitive, ...] = tuple(primitives)
        names = [p.name for p in self.primitives]
        if len(set(names)) != len(names):
            raise ValueError(f"Primitive names must be unique, got {names}.")
        self._by_name = {p.name: p for p in self.primitives}

        pairs = [(a, b) for a in self.primitives for b in self.primitives if _valid_pair(a, b)]
        heldout = self._choose_heldout(pairs, num_heldout_tasks)
        pool = [pair for pair in pairs if pair not in heldout]
        train = self._choose_train(pool, num_train_tasks)

        self._train = [self._task(pair, heldout=False) for pair in train]
        self._heldout = [self._task(pair, heldout=True) for pair in heldout]
        self._check_split()

    # -- split ------------------------------------------------------------------------------------------------
    def _task(self, pair: tuple[Primitive, Primitive], heldout: bool) -> SyntheticTask:
        return SyntheticTask(
            name=f"{pair[0].name}_then_{pair[1].name}",
            primitives=(pair[0].name, pair[1].name),
            heldout=heldout,
            steps=pair,
        )

    def _choose_heldout(
        self, pairs: list[tuple[Primitive, Primitive]], count: int
    ) -> list[tuple[Primitive, Primitive]]:
        """Greedy, seeded choice of held-out pairs that keeps every (primitive, position) slot covered by training."""
        needed = _coverage_slots(pairs)
        # Spread the held-out tasks over the primitives: none appears more than its share. A greedy pass can get
        # stuck near the end, so retry with the next seeded order (deterministic: same seed, same split).
        max_uses = max(1, math.ceil(2 * count / len(self.primitives)))
        rng = random.Random(f"synthetic-heldout-{self.seed}")
        chosen: list[tuple[Primitive, Primitive]] = []
        for _ in range(100):
            candidates = list(pairs)
            rng.shuffle(candidates)
            chosen = []
            uses: dict[str, int] = {}
            for pair in candidates:
                if len(chosen) == count:
                    break
                if any(uses.get(p.name, 0) >= max_uses for p in pair):
                    continue
                remaining = [other for other in pairs if other not in chosen and other != pair]
                if _coverage_slots(remaining) != needed:
                    continue
                chosen.append(pair)
                for p in pair:
                    uses[p.name] = uses.get(p.name, 0) + 1
            if len(chosen) == count:
                break
        else:
            raise ValueError(f"Could not hold out {count} tasks while keeping every skill in training.")
        return sorted(chosen, key=self._pair_key)

    def _choose_train(
        self, pool: list[tuple[Primitive, Primitive]], count: int | None
    ) -> list[tuple[Primitive, Primitive]]:
        """All of `pool`, or a seeded subset of `count` pairs that still covers every (primitive, position) slot."""
        if count is None or count >= len(pool):
            if count is not None and count > len(pool):
                logger.warning("num_train_tasks=%d but only %d training compositions exist.", count, len(pool))
            return sorted(pool, key=self._pair_key)
        candidates = list(pool)
        random.Random(f"synthetic-train-{self.seed}").shuffle(candidates)
        needed = _coverage_slots(pool)
        chosen: list[tuple[Primitive, Primitive]] = []
        covered: set[tuple[str, int]] = set()
        # First cover every slot, then fill up in the seeded order.
        for pair in candidates:
            new = _coverage_slots([pair]) - covered
            if new:
                chosen.append(pair)
                covered |= new
        if covered != needed or len(chosen) > count:
            raise ValueError(
                f"num_train_tasks={count} is too small to train every primitive in every position "
                f"(needs at least {len(chosen)})."
            )
        for pair in candidates:
            if len(chosen) == count:
                break
            if pair not in chosen:
                chosen.append(pair)
        return sorted(chosen, key=self._pair_key)

    def _pair_key(self, pair: tuple[Primitive, Primitive]) -> tuple[int, int]:
        return (self.primitives.index(pair[0]), self.primitives.index(pair[1]))

    def _check_split(self) -> None:
        train_pairs = {t.primitives for t in self._train}
        possible = _coverage_slots(
            (a, b) for a in self.primitives for b in self.primitives if _valid_pair(a, b)
        )  # slots any composition can fill
        trained = {(name, pos) for pair in train_pairs for pos, name in enumerate(pair)}
        for task in self._heldout:
            if task.primitives in train_pairs:
                raise AssertionError(f"Held-out task {task.name} is also a training task.")
            for name in task.primitives:
                for position in (0, 1):
                    if (name, position) in possible and (name, position) not in trained:
                        raise AssertionError(f"Primitive {name!r} of held-out {task.name} is untrained at {position}.")

    # -- public API -------------------------------------------------------------------------------------------
    def train_tasks(self) -> list[SyntheticTask]:
        """The training tasks (compositions whose instructions and examples may be trained on)."""
        return list(self._train)

    def heldout_tasks(self) -> list[SyntheticTask]:
        """The held-out tasks: unseen compositions of primitives that all appear in training tasks."""
        return list(self._heldout)

    def compose(self, first: str, second: str) -> SyntheticTask:
        """The task "`first`, then `second`" by primitive names (a training, held-out or unused composition)."""
        pair = (self._by_name[first], self._by_name[second])
        if not _valid_pair(*pair):
            raise ValueError(f"{first!r} cannot be followed by {second!r}.")
        return self._task(pair, heldout=any(task.primitives == (first, second) for task in self._heldout))

    def task(self, name: str) -> SyntheticTask:
        """A training or held-out task by name."""
        for task in self._train + self._heldout:
            if task.name == name:
                return task
        raise KeyError(f"No task named {name!r} in this suite.")

    def examples(
        self,
        tasks: Iterable[SyntheticTask],
        num_instances: int,
        split: Split = "train",
        seed: int = 0,
    ) -> list[dict]:
        """Examples of `tasks`, `num_instances` per task, in the project's example format.

        Args:
            tasks: tasks of this suite (e.g. `train_tasks()` or `heldout_tasks()`).
            num_instances: examples per task; distinct inputs within a task (3 to 7 distinct lexicon words).
            split: "train" gives every example a training paraphrase, drawn at random. "eval" gives examples of
                held-out tasks the evaluation-only families in turn (example i of a task: family i mod 3, so each
                family gets a third of the examples); training tasks keep training paraphrases (the evaluation-only
                families never reach them), their canonical ones in turn (one per connective), with inputs drawn
                from a different stream than the "train" split. Three wordings per task keep evaluation fast: each
                wording is one generated adapter.
            seed: example seed; the same (suite seed, seed, split, task) always gives the same examples, whatever
                the other tasks or `num_instances` of a call (a smaller call gives a prefix of a larger one).

        Returns:
            A list of dicts with keys `task_name`, `instruction`, `input`, `output`, `category` (the first primitive
            of the task), `choices` ([]) and `references` ([output]).
        """
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
        if num_instances < 0:
            raise ValueError(f"num_instances must be >= 0, got {num_instances}.")
        out: list[dict] = []
        for task in tasks:
            rotate = split == "eval"
            if not rotate:
                instructions = task.instructions(train=True)
            elif task.heldout:
                instructions = task.instructions(train=False)
            else:
                instructions = task.canonical_instructions()
            # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs and platforms.
            rng = random.Random(f"synthetic-examples-{self.seed}-{seed}-{split}-{task.name}")
            seen: set[tuple[str, ...]] = set()
            while len(seen) < num_instances:
                words = tuple(rng.sample(LEXICON, rng.randint(MIN_INPUT_WORDS, MAX_INPUT_WORDS)))
                instruction = rng.choice(instructions)
                if words in seen:
                    continue
                if rotate:
                    instruction = instructions[len(seen) % len(instructions)]
                seen.add(words)
                output = task.apply(words)
                out.append(
                    {
                        "task_name": task.name,
                        "instruction": instruction,
                        "input": " ".join(words),
                        "output": output,
                        "category": task.primitives[0],
                        "choices": [],
                        "references": [output],
                    }
                )
        return out

    def paraphrase_family(self, example: dict) -> str:
        """The evaluation-only family of a held-out example's instruction, as "k: template" (k from 1)."""
        k = self.task(example["task_name"]).instructions(train=False).index(example["instruction"])
        return f"{k + 1}: {EVAL_FAMILIES[k]}"

    def training_wording_examples(self, examples: list[dict]) -> list[dict]:
        """The same examples, each under one of its task's canonical training wordings (in turn, as the
        evaluation-only families are): the reference for how much the evaluation-only wordings cost."""
        out = []
        for i, e in enumerate(examples):
            wordings = self.task(e["task_name"]).canonical_instructions()
            out.append({**e, "instruction": wordings[i % len(wordings)]})
        return out

    def instruction_swap_examples(self, examples: list[dict]) -> list[dict]:
        """Each task's examples under the next task's instruction (tasks in order of appearance, the last under the
        first): `references` are what the given instruction asks for, `own_references` what the inputs' own task
        would give. A model that follows its instruction scores high on the first and low on the second."""
        tasks = list(dict.fromkeys(e["task_name"] for e in examples))
        instruction_of = {e["task_name"]: e["instruction"] for e in reversed(examples)}  # each task's first wording
        swapped = []
        for e in examples:
            given = tasks[(tasks.index(e["task_name"]) + 1) % len(tasks)]
            answer = self.task(given).apply(e["input"].split())
            swapped.append(
                {**e, "instruction": instruction_of[given], "given_task": given, "references": [answer],
                 "own_references": e["references"]}
            )  # fmt: skip
        return swapped

    def _wording_index(self, task: SyntheticTask, instruction: str) -> tuple[bool, int]:
        """(evaluation-only, k): the family (held-out task) or canonical connective (training task) of a wording."""
        if task.heldout and instruction in task.instructions(train=False):
            return True, task.instructions(train=False).index(instruction)
        canonical = task.canonical_instructions()
        if instruction not in canonical:
            raise ValueError(
                f"{instruction!r} is neither an evaluation-only nor a canonical wording of {task.name}: the step-order "
                "control rewords the examples of split='eval'."
            )
        return False, canonical.index(instruction)

    def step_order_examples(self, examples: list[dict]) -> list[dict]:
        """The examples under an instruction that asks for their task's two steps the other way round.

        An example of "a, then b" gets the wording of "b, then a" in its own family (an evaluation-only family for a
        held-out task, the same canonical connective for a training task), and is kept only where "b, then a" is a
        valid composition and gives another answer on its input. `references` hold the swapped order's answer,
        `own_instruction` and `own_references` the original wording and answer. A model that reads the order of the steps matches the first; one that
        only recognises which steps are named matches the second.
        """
        out = []
        for e in examples:
            task = self.task(e["task_name"])
            first, second = task.steps
            if not _valid_pair(second, first):
                continue
            words = e["input"].split()
            swapped = self._task((second, first), heldout=False)
            answer = swapped.apply(words)
            if answer == task.apply(words):
                continue
            evaluation_only, k = self._wording_index(task, e["instruction"])
            if evaluation_only:
                instruction = _connect(EVAL_FAMILIES[k], second.eval_phrasings[k], first.eval_phrasings[k])
            else:
                instruction = _connect(
                    CONNECTIVES[k],
                    second.phrasings[k % len(second.phrasings)],
                    first.phrasings[k % len(first.phrasings)],
                )
            out.append(
                {**e, "instruction": instruction, "given_task": swapped.name, "references": [answer],
                 "own_instruction": e["instruction"], "own_references": e["references"]}
            )  # fmt: skip
        return out

    def shuffled_instruction_examples(self, examples: list[dict], seed: int = 0) -> list[dict]:
        """The examples with each instruction's words in a random order (one order per instruction, punctuation
        dropped): the same words, no sentence. A model that reads the instruction, not just its words, fails."""
        out = []
        for e in examples:
            words = [w for w in words_of(e["instruction"]) if w[0].isalnum()]
            rng = random.Random(f"shuffled-{self.seed}-{seed}-{e['instruction']}")
            rng.shuffle(words)
            out.append({**e, "instruction": " ".join(words) + "."})
        return out

    def open_vocabulary_examples(self, examples: list[dict]) -> list[dict]:
        """The examples reworded in the open-vocabulary family (`OPEN_VOCABULARY_PHRASINGS`, the two templates in
        turn): the same tasks and answers, in words outside the suite's vocabulary."""
        out = []
        for i, e in enumerate(examples):
            first, second = self.task(e["task_name"]).steps
            template = OPEN_VOCABULARY_TEMPLATES[i % len(OPEN_VOCABULARY_TEMPLATES)]
            instruction = _connect(
                template, OPEN_VOCABULARY_PHRASINGS[first.name], OPEN_VOCABULARY_PHRASINGS[second.name]
            )
            out.append({**e, "instruction": instruction})
        return out

    def free_wording_examples(
        self, examples: list[dict], fraction: float, seed: int = 0, variety: int | None = None
    ) -> list[dict]:
        """The examples with about `fraction` of them reworded in free wordings (one of the first `variety`
        `FREE_WORDING_PHRASINGS` of each step and of the first `variety` `FREE_WORDING_TEMPLATES`, drawn at random;
        None: all of them): for training a model that reads instructions with a pretrained encoder. Every example
        keeps its original instruction as `teacher_instruction`, which the meta-train teacher reads
        (`TagiDataCollator`); tasks, inputs and answers are unchanged. The same arguments give the same examples."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
        most = min(len(FREE_WORDING_TEMPLATES), *(len(p) for p in FREE_WORDING_PHRASINGS.values()))
        variety = most if variety is None else variety
        if not 1 <= variety <= most:
            raise ValueError(f"variety must be between 1 and {most} (the free wordings there are), got {variety}.")
        out = []
        for i, e in enumerate(examples):
            rng = random.Random(f"free-wording-{self.seed}-{seed}-{i}-{e['task_name']}-{e['input']}")
            instruction = e["instruction"]
            if rng.random() < fraction:
                first, second = self.task(e["task_name"]).steps
                instruction = _connect(
                    rng.choice(FREE_WORDING_TEMPLATES[:variety]),
                    rng.choice(FREE_WORDING_PHRASINGS[first.name][:variety]),
                    rng.choice(FREE_WORDING_PHRASINGS[second.name][:variety]),
                )
            out.append({**e, "instruction": instruction, "teacher_instruction": e["instruction"]})
        return out

    def random_instruction_examples(self, examples: list[dict], seed: int = 0) -> list[dict]:
        """The examples with a random string of the suite's words in place of each instruction (as many words, one
        string per instruction): what a model that ignores its instruction scores as well as with the real one."""
        words = [w for w in self.vocabulary() if w[0].isalnum()]
        out = []
        for e in examples:
            rng = random.Random(f"random-instruction-{self.seed}-{seed}-{e['instruction']}")
            length = len([w for w in words_of(e["instruction"]) if w[0].isalnum()])
            out.append({**e, "instruction": _capitalise(" ".join(rng.choices(words, k=length))) + "."})
        return out

    def pretraining_texts(self, n: int, seed: int = 0, task_instructions: bool = True) -> list[str]:
        """`n` plain texts in the suite's vocabulary, for pretraining a small base model and the hypernetwork.

        Each text joins 2 to 4 sentences: word lists, facts about the lexicon ("cat is a animal.", "the partner of
        cat is dog.") and training instructions of single steps or of training tasks. Evaluation-only paraphrases
        and held-out instructions never appear, so pretraining cannot leak the held-out split.

        With `task_instructions=False` the instructions are single steps only: the texts then hold nothing that
        depends on which tasks this suite holds out (every primitive is trained under every split), as a base model
        shared by all seeds' splits needs.
        """
        rng = random.Random(f"synthetic-pretraining-{self.seed}-{seed}")
        train_instructions = [
            text for task in self._train for text in task.instructions(train=True)[: len(CONNECTIVES)]
        ]
        step_phrasings = sorted(
            {phrasing for task in self._train for step in task.steps for phrasing in step.phrasings}
        )
        texts: list[str] = []
        for _ in range(n):
            sentences = []
            for _ in range(rng.randint(2, 4)):
                kind = rng.random()
                if kind < 0.35:
                    words = rng.sample(LEXICON, rng.randint(MIN_INPUT_WORDS, MAX_INPUT_WORDS))
                    sentences.append(" ".join(words) + ".")
                elif kind < 0.7:
                    word = rng.choice(LEXICON)
                    template = rng.choice(_FACT_TEMPLATES)
                    sentences.append(
                        _capitalise(
                            template.format(
                                w=word, k=KIND_OF[word], ak=_with_article(KIND_OF[word]), p=PARTNER_OF[word]
                            )
                        )
                    )
                elif kind < 0.85 or not task_instructions:
                    sentences.append(_capitalise(rng.choice(step_phrasings)) + ".")
                else:
                    sentences.append(rng.choice(train_instructions))
            texts.append(" ".join(sentences))
        return texts

    def vocabulary(self) -> list[str]:
        """Every token that can appear in the suite's instructions, inputs, outputs and pretraining texts.

        Tokens are lowercase words and punctuation marks, as `words_of` splits text. The order is deterministic:
        lexicon, kinds, numbers, "none", then the other words sorted, then punctuation.
        """
        texts: list[str] = [*FORMAT_WORDS, "a", "an"]
        for template in (*CONNECTIVES, *EVAL_FAMILIES, *_FACT_TEMPLATES):
            texts.append(re.sub(r"\{\w+\}", " ", template))
        for primitive in self.primitives:
            texts.extend(primitive.phrasings)
            texts.extend(primitive.eval_phrasings)
        rest = {token for text in texts for token in words_of(text)}
        head = [*LEXICON, *KINDS, *NUMBER_WORDS, EMPTY_OUTPUT]
        rest -= set(head)
        words = sorted(t for t in rest if t[0].isalnum())
        punctuation = sorted(t for t in rest if not t[0].isalnum())
        return head + words + punctuation


def suite_tokenizer(suite: SyntheticSuite | None = None, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the vocabulary of `suite` (default: `SyntheticSuite()`)."""
    suite = suite if suite is not None else SyntheticSuite()
    return build_word_tokenizer(
        suite.vocabulary(), model_max_length=model_max_length, vocabulary_command=VOCABULARY_COMMAND
    )


def synthetic_dataset(
    tasks: Literal["train", "heldout"] = "train",
    num_instances: int = 64,
    split: Split | None = None,
    seed: int = 0,
    suite: SyntheticSuite | None = None,
) -> datasets.Dataset:
    """Examples of the suite's training or held-out tasks as a `datasets.Dataset`.

    Args:
        tasks: "train" for `suite.train_tasks()`, "heldout" for `suite.heldout_tasks()`.
        num_instances: examples per task.
        split: paraphrase split (see `SyntheticSuite.examples`); default "train" for training tasks and "eval" (the
            evaluation-only paraphrases) for held-out tasks.
        seed: example seed.
        suite: the suite (default: `SyntheticSuite()`).
    """
    import datasets

    from .example import example_features

    suite = suite if suite is not None else SyntheticSuite()
    if tasks not in ("train", "heldout"):
        raise ValueError(f"tasks must be 'train' or 'heldout', got {tasks!r}.")
    chosen = suite.train_tasks() if tasks == "train" else suite.heldout_tasks()
    split = split if split is not None else ("train" if tasks == "train" else "eval")
    rows = suite.examples(chosen, num_instances=num_instances, split=split, seed=seed)
    features = example_features()
    return datasets.Dataset.from_list(rows, features=features)


__all__ = [
    "EVAL_FAMILIES",
    "FREE_WORDING_PHRASINGS",
    "FREE_WORDING_TEMPLATES",
    "OPEN_VOCABULARY_PHRASINGS",
    "OPEN_VOCABULARY_TEMPLATES",
    "LEXICON",
    "PRIMITIVES",
    "Primitive",
    "SyntheticSuite",
    "SyntheticTask",
    "suite_tokenizer",
    "synthetic_dataset",
    "words_of",
]
