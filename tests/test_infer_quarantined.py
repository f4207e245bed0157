"""Error records for rows prepare rejected from infer.source carry the prompt those rows would have had."""

from __future__ import annotations

from vlm_ray.config import parse_spec
from vlm_ray.infer.quarantined import fixed_prompt

BASE = {"model": {"name": "m"}, "data": {"source": "train.jsonl", "prompt": "Transcribe."}}


def _spec(data: dict | None = None, infer: dict | None = None):
    return parse_spec({**BASE, "data": {**BASE["data"], **(data or {})}, "infer": infer or {}})


def test_infer_prompt_wins_then_the_data_prompt():
    assert fixed_prompt(_spec(infer={"source": "imgs/", "prompt": "Caption."})) == "Caption."
    assert fixed_prompt(_spec(infer={"source": "imgs/"})) == "Transcribe."


def test_a_per_row_prompt_column_of_infer_source_means_no_fixed_prompt():
    assert fixed_prompt(_spec(infer={"source": "imgs.jsonl", "prompt_column": "q"})) is None


def test_the_training_data_prompt_column_does_not_apply_to_infer_source():
    # infer.source is read with its own columns: every row gets data.prompt
    assert (
        fixed_prompt(_spec(data={"prompt_column": "question"}, infer={"source": "imgs/"}))
        == "Transcribe."
    )
