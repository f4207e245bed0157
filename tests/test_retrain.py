"""Scheduled retraining on CPU with a tiny model, on a real local Ray cluster: the first run
becomes the champion; a challenger that does not beat it by the margin leaves it in place,
with both scores, measured on the challenger's held-out set, recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_ray import layout
from vlm_ray.config import JobSpec, load_spec
from vlm_ray.run_status import run_status
from vlm_ray.stages.promote import CHAMPION_TAG, CURRENT, PROMOTIONS
from vlm_ray.storage import open_store

ROOT = Path(__file__).parent.parent


def _spec(root: Path, run: str, quick: list[str], *extra: str) -> JobSpec:
    return load_spec(
        ROOT / "examples/demo.yaml",
        [
            f"run.uri={root}/runs/{run}",
            f"promote.root={root}",
            *quick,
            "infer.models=[finetuned]",
            *extra,
        ],
    )


def test_first_run_is_promoted_and_an_equal_challenger_keeps_the_champion(
    ray_cluster: None, quick_demo_overrides: list[str], tmp_path: Path
) -> None:
    from vlm_ray.retrain import run_retrain

    root = open_store(str(tmp_path))
    first = run_retrain(_spec(tmp_path, "r1", quick_demo_overrides, "promote.margin=0.05"))
    assert first["decision"] == "promoted" and first["champion_score"] is None
    r1 = open_store(str(tmp_path / "runs/r1")).uri
    assert root.read_json(CURRENT)["run"] == r1
    assert root.read_json(CURRENT)["model_info"] == open_store(r1).read_json(layout.MODEL_INFO)

    # Same data, same seeds: the challenger is as good as the champion, not better by 0.05.
    second = run_retrain(_spec(tmp_path, "r2", quick_demo_overrides, "promote.margin=0.05"))
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
    again = run_retrain(_spec(tmp_path, "r2", quick_demo_overrides, "promote.margin=0.05"))
    assert again["decision"] == "kept" and again["record"] == second["record"]
    assert len(list(root.list(PROMOTIONS))) == 2

    # `vlm-ray status` shows each run's gate decision, and the champion to a run not yet decided.
    (promote,) = [
        s
        for s in run_status(_spec(tmp_path, "r2", quick_demo_overrides))["stages"]
        if s["stage"] == "promote"
    ]
    assert (promote["state"], promote["facts"]["decision"]) == ("done", "kept")
    assert promote["detail"].endswith(f"-> {second['record']}")
    (waiting,) = [
        s
        for s in run_status(_spec(tmp_path, "r3", quick_demo_overrides))["stages"]
        if s["stage"] == "promote"
    ]
    assert waiting["state"] == "not started"
    assert waiting["detail"] == f"no decision on this run; champion: {r1}"
