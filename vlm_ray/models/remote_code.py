"""Models whose code ships with their weights (DeepSeek-OCR): loaded only from a local snapshot, and only
when the job spec says model.trust_remote_code=true.

transformers runs the snapshot's Python files on from_pretrained, so the flag is off
by default and a hub id is refused: the code that runs must be code someone put in
a folder (or an s3:// folder) they control and could review.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def uses_remote_code(model_dir: str | Path) -> bool:
    """True when the folder's config.json maps Auto classes to Python files in the folder (auto_map)."""
    config = Path(model_dir) / "config.json"
    return config.is_file() and "auto_map" in json.loads(config.read_text())


def check_remote_code(
    model_name: str, model_dir: str | Path | None, trust_remote_code: bool
) -> None:
    """Refuse remote code unless model.trust_remote_code is set and the model is a local (or s3://) snapshot."""
    if model_dir is None or not Path(model_dir).is_dir():
        if trust_remote_code:
            raise ValueError(
                f"model.trust_remote_code=true runs Python code shipped with the model, so model.name must "
                f"be a local or s3:// folder (a snapshot you reviewed), not {model_name!r}; download it first "
                "(huggingface-cli download <id> --local-dir <folder>)"
            )
        return
    if uses_remote_code(model_dir) and not trust_remote_code:
        raise ValueError(
            f"{model_dir}/config.json maps its model classes to Python files shipped in the folder (auto_map); "
            "review them, then set model.trust_remote_code=true to run them"
        )


def load_remote_code_model(
    model_dir: str | Path, trust_remote_code: bool, dtype: Any = None
) -> tuple[Any, Any]:
    """(model, tokenizer) of a remote-code snapshot through AutoModel / AutoTokenizer, offline."""
    from transformers import AutoModel, AutoTokenizer

    check_remote_code(str(model_dir), model_dir, trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    model = AutoModel.from_pretrained(model_dir, dtype=dtype, **kwargs)
    return model, tokenizer
