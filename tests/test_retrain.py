"""Scheduled retraining on CPU with a tiny model, on a real local Ray cluster: the first run
becomes the champion; a challenger that does not beat it by the margin leaves it in place,
with both scores, measured on the challenger's held-out set, recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_ray import layout
from vlm_ray.config import JobSpec, load_spec
from vlm_ray.demo_data import write_digits_dataset
from vlm_ray.stages.promote import CHAMPION_TAG, CURRENT, PROMOTIONS
from vlm_ray.storage import open_store

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_dataset(tmp_path_factory.mktemp("digits"), limit=40)


def _spec(root: Path, run: str, model: Path, data: Path, *extra: str) -> JobSpec:
    return load_spec(
        ROOT / "examples/demo.yaml",
        [
            f"run.uri={root}/runs/{run}",
            f"promote.root={root}",
            f"model.name={model}",
            f"data.source={data}",
            "data.heldout_fraction=0.25",
            "data.rows_per_shard=20",
            "train.max_steps=2",
            "train.per_device_train_batch_size=4",
            "train.warmup_steps=0",
            "generation.max_new_tokens=2",
            "generation.batch_size=8",
            "infer.models=[finetuned]",
            *extra,
        ],
    )


def test_first_run_is_promoted_and_an_equal_challenger_keeps_the_champion(
    ray_cluster: None, tiny_qwen2_vl: Path, digits: Path, tmp_path: Path
) -> None:
    from vlm_ray.retrain import run_retrain

    root = open_store(str(tmp_path))
    first = run_retrain(_spec(tmp_path, "r1", tiny_qwen2_vl, digits, "promote.margin=0.05"))
    assert first["decision"] == "promoted" and first["champion_score"] is None
    r1 = open_store(str(tmp_path / "runs/r1")).uri
    assert root.read_json(CURRENT)["run"] == r1
    assert root.read_json(CURRENT)["model_info"] == open_store(r1).read_json(layout.MODEL_INFO)

    # Same data, same seeds: the challenger is as good as the champion, not better by 0.05.
    second = run_retrain(_spec(tmp_path, "r2", tiny_qwen2_vl, digits, "promote.margin=0.05"))
    assert second["decision"] == "kept"
    assert second["champion"]["run"] == r1
    assert second["challenger_score"] == pytest.approx(second["champion_score"], abs=1e-9)
    assert root.read_json(CURRENT)["run"] == r1

    # The champion was scored on the challenger's own held-out rows, every row once.
    r2 = open_store(str(tmp_path / "runs/r2"))
    heldout = r2.read_json(layout.EVAL_METRICS)["rows"]
    predicted = sum(
        r2.read_text(k).count("\n")
        for k in r2.list(layout.predictions_dir(CHAMPION_TAG))
        if k.endswith(".jsonl") and "/_done/" not in k
    )
    assert heldout > 0 and predicted == heldout

    records = [root.read_json(k) for k in sorted(root.list(PROMOTIONS))]
    assert [r["decision"] for r in records] == ["promoted", "kept"]
    assert records[1]["spec"]["run"]["uri"].endswith("runs/r2")

    # Resubmitting a decided run returns its decision; it neither retrains nor decides twice.
    again = run_retrain(_spec(tmp_path, "r2", tiny_qwen2_vl, digits, "promote.margin=0.05"))
    assert again["decision"] == "kept" and again["record"] == second["record"]
    assert len(list(root.list(PROMOTIONS))) == 2
