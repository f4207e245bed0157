"""No truncation default on a saved or loaded tokenizer (see forget_truncation).

No transformers import: the Unsloth engine imports unsloth before transformers, and saving
(which uses this) must stay safe to import first.
"""

from __future__ import annotations

from typing import Any


def forget_truncation(processor: Any) -> None:
    """Clear a truncation setting the tokenizer carries from an earlier call or from its files.

    The training collator tokenizes with truncation at model.max_seq_length, and the Rust
    tokenizer keeps that setting: saved as it is, tokenizer.json carries it, and transformers
    reads it back as the loaded tokenizer's default max_length (its `init_kwargs`), which the
    processor then passes on every call (a warning on every inference batch; a default that
    would cut image tokens wherever truncation is asked for). Cleared before saving, and on
    loading for inference (models saved before this, or elsewhere).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is not None:
        backend.no_truncation()
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    if isinstance(init_kwargs, dict):
        for key in ("max_length", "truncation_strategy"):
            init_kwargs.pop(key, None)
