"""A word-level tokenizer made in code, for small models trained from scratch on a closed vocabulary.

Sub-word tokenizers split rare words into many pieces; on 2 CPU cores a small T5 trained from random weights on
byte-level tokens learnt nothing in minutes, while one word per token made the same model ~8x faster per step and
able to learn (see DESIGN.md, "The embedded default"). The synthetic suite has a closed vocabulary, so a `tokenizers`
WordLevel model over that vocabulary loses nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
# T5 conventions: pad 0 (also the decoder start token), eos 1, unk 2.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build a word-level fast tokenizer whose vocabulary is `words` (plus `<pad>`=0, `</s>`=1, `<unk>`=2).

    Text is lowercased and split on whitespace and punctuation; every sequence gets `</s>` appended, as T5 expects.
    Decoding joins words with single spaces and glues punctuation back to the preceding word, so
    `decode(encode("First reverse the words."))` reads "first reverse the words.".

    Args:
        words: the vocabulary, one token per entry (words or punctuation marks). Entries are lowercased; duplicates
            and special tokens are ignored; the order of first appearance fixes the ids (from 3 on).
        model_max_length: stored on the transformers tokenizer (truncation length when `truncation=True`).

    Returns:
        A `transformers.PreTrainedTokenizerFast` with `pad_token`, `eos_token` and `unk_token` set; it round-trips
        through `save_pretrained` / `PreTrainedTokenizerFast.from_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    vocab: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        word = word.lower()
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"Vocabulary entries must be single non-empty tokens without whitespace, got {word!r}.")
        vocab.setdefault(word, len(vocab))

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Lowercase()
    # Punctuation is isolated so that "words." is the two tokens "words" and ".".
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    eos_id = vocab[EOS_TOKEN]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
    )
    # There is no WordLevel decoder; WordPiece's joins tokens with spaces and its cleanup removes the space before
    # "." and "," (no vocabulary word starts with the "##" continuation prefix, so nothing else changes).
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Registered as special tokens so that a literal "</s>" in a text is one token, not "<", "/", "s", ">".
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


__all__ = ["EOS_TOKEN", "PAD_TOKEN", "UNK_TOKEN", "build_word_tokenizer"]
