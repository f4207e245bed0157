"""Train a small byte-level BPE tokenizer locally, so tiny models need no hub download."""

from __future__ import annotations

import itertools
import random
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "is",
    "on",
    "with",
    "for",
    "and",
    "this",
    "image",
    "shows",
    "picture",
    "photo",
    "text",
    "digit",
    "number",
    "handwritten",
    "written",
    "letter",
    "word",
    "line",
    "page",
    "document",
    "describe",
    "caption",
    "transcribe",
    "read",
    "what",
    "which",
    "there",
    "are",
    "black",
    "white",
    "red",
    "green",
    "blue",
    "small",
    "large",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "formula",
    "equation",
    "latex",
    "sum",
    "integral",
    "fraction",
    "square",
    "root",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "theta",
    "lambda",
    "sigma",
    "pi",
    "infinity",
    "plus",
    "minus",
    "times",
    "cat",
    "dog",
    "person",
    "man",
    "woman",
    "child",
    "street",
    "car",
    "tree",
    "sky",
    "house",
    "table",
    "chair",
    "book",
    "sign",
    "road",
    "water",
    "answer",
    "question",
    "you",
    "are",
    "a",
    "helpful",
    "assistant",
    "please",
    "output",
    "only",
    "the",
    "in",
    "this",
]
_LATEX = [
    r"\frac{a}{b}",
    r"\sqrt{x}",
    r"x^{2}",
    r"y_{i}",
    r"\sum_{i=1}^{n}",
    r"\int_{0}^{1}",
    r"\alpha",
    r"\beta",
    r"\gamma",
    r"\left(",
    r"\right)",
    r"\cdot",
    r"\mathrm{d}",
    r"=",
    r"+",
    r"-",
    r"(",
    r")",
    r"[",
    r"]",
    r"{",
    r"}",
]


def build_corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic training text: English words, digits, numbers and LaTeX pieces."""
    rng = random.Random(seed)
    lines = [" ".join(str(d) for d in range(10)), "0123456789"]
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.55:
                parts.append(rng.choice(_WORDS))
            elif r < 0.8:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 5))))
            else:
                parts.append(rng.choice(_LATEX))
        lines.append(" ".join(parts).capitalize() + rng.choice([".", "?", "", ":"]))
    # every printable ASCII character in one line keeps the byte alphabet well covered
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


def train_bpe_tokenizer(
    special_tokens: list[str], vocab_size: int = 1024, seed: int = 0
) -> Tokenizer:
    """A byte-level BPE like Qwen's/Llama's: every string round-trips, no unknown token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = build_corpus(seed=seed)
    tok.train_from_iterator(itertools.chain(corpus, corpus), trainer=trainer)
    return tok


def build_family_tokenizer(
    special_tokens: list[str],
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
    vocab_size: int = 1024,
    padding_side: str = "left",
) -> Any:
    """A PreTrainedTokenizerFast trained here with a family's special tokens (ids 0.. in list order).

    add_bos: prepend bos_token when add_special_tokens=True, as Llama/Gemma/Mistral tokenizers do
    (their chat templates write the BOS themselves, so a template rendering must be tokenized with
    add_special_tokens=False, as Unsloth's collator does).
    extra_special_tokens: named tokens a processor reads off the tokenizer (Gemma 3's boi_token, ...).
    """
    from transformers import PreTrainedTokenizerFast

    raw = train_bpe_tokenizer(special_tokens, vocab_size=vocab_size)
    if add_bos and bos is not None:
        bos_id = raw.token_to_id(bos)
        raw.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
                ),
            ]
        )
    named = {eos, pad} | ({bos} if bos else set()) | ({unk} if unk else set())
    named |= set((extra_special_tokens or {}).values())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=[t for t in special_tokens if t not in named],
        extra_special_tokens=extra_special_tokens or {},
        model_max_length=131072,
        padding_side=padding_side,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
