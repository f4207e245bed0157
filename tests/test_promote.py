"""The promotion gate: a pure decision over two metric dicts, and the pointer + records it keeps
under the promotion root (on a local folder and on a real S3 server)."""

from __future__ import annotations

import pytest

from vlm_ray import layout
from vlm_ray.config import JobSpec, parse_spec
from vlm_ray.stages.promote import (
    CURRENT,
    PROMOTIONS,
    decide_promotion,
    promotion_root,
    run_promote,
)
from vlm_ray.storage import S3Store, Store


def test_first_run_promotes_by_default_when_the_base_model_was_not_scored() -> None:
    d = decide_promotion("cer", {"cer": 0.9}, None, margin=0.1)
    assert d.promote and "first run promotes by default" in d.reason
    assert d.champion_score is None and d.base_score is None


def test_a_first_run_no_better_than_the_base_model_is_not_promoted() -> None:
    kept = decide_promotion("cer", {"cer": 0.95}, None, margin=0.05, base={"cer": 0.97})
    assert not kept.promote
    assert kept.reason == (
        "no champion yet: challenger cer 0.9500 does not beat the base model's 0.9700 by margin 0.05"
    )
    assert (kept.challenger_score, kept.champion_score, kept.base_score) == (0.95, None, 0.97)
    won = decide_promotion("exact_match", {"exact_match": 0.9}, None, 0.0, base={"exact_match": 0})
    assert won.promote and "beats the base model's 0.0000" in won.reason


def test_lower_is_better_metric_must_drop_by_the_margin() -> None:
    assert decide_promotion("cer", {"cer": 0.10}, {"cer": 0.20}, margin=0.05).promote
    kept = decide_promotion("cer", {"cer": 0.18}, {"cer": 0.20}, margin=0.05)
    assert not kept.promote
    assert (kept.challenger_score, kept.champion_score) == (0.18, 0.20)
    assert not decide_promotion("wer", {"wer": 0.30}, {"wer": 0.20}, margin=0.0).promote


def test_higher_is_better_metric_must_rise_by_the_margin() -> None:
    assert decide_promotion("exact_match", {"exact_match": 0.9}, {"exact_match": 0.8}, 0.05).promote
    assert not decide_promotion(
        "exact_match", {"exact_match": 0.82}, {"exact_match": 0.8}, 0.05
    ).promote
    assert not decide_promotion("bleu", {"bleu": 10.0}, {"bleu": 30.0}, 0.0).promote


def test_equal_scores_keep_the_champion() -> None:
    assert not decide_promotion("cer", {"cer": 0.2}, {"cer": 0.2}, margin=0.01).promote


def test_a_metric_evaluate_did_not_compute_is_named() -> None:
    with pytest.raises(ValueError, match=r"no 'chrf'.*eval\.metric"):
        decide_promotion("chrf", {"cer": 0.1}, None, margin=0.0)


def _spec(store: Store, metric: str = "cer", margin: float = 0.05) -> JobSpec:
    endpoint = store.endpoint_url if isinstance(store, S3Store) else None
    return parse_spec(
        {
            "run": {"uri": store.uri_of("runs/x"), "s3_endpoint_url": endpoint},
            "model": {"name": "tiny"},
            "data": {"source": "data.jsonl"},
            "eval": {"metric": metric},
            "promote": {"margin": margin},
        }
    )


def _finished_run(
    store: Store, name: str, challenger: float, champion: float | None, base: float = 1.0
) -> str:
    """A run folder as evaluate leaves it: eval/metrics.json + model/model_info.json."""
    models = {"base": {"cer": base}, "finetuned": {"cer": challenger}}
    if champion is not None:
        models["champion"] = {"cer": champion}
    run = store.child(f"runs/{name}")
    run.write_json(layout.EVAL_METRICS, {"models": models, "rows": 12})
    run.write_json(layout.MODEL_INFO, {"kind": "full", "path": "model/merged", "base_model": "m"})
    return run.uri


def test_pointer_moves_only_when_the_challenger_wins_and_every_decision_is_kept(
    store: Store,
) -> None:
    spec = _spec(store)
    first = run_promote(spec, _finished_run(store, "r1", 0.40, None), store.uri)
    assert first["decision"] == "promoted"
    assert store.read_json(CURRENT)["run"] == store.uri_of("runs/r1")
    assert store.read_json(CURRENT)["model_info"]["path"] == "model/merged"

    worse = run_promote(spec, _finished_run(store, "r2", 0.38, 0.40), store.uri)
    assert worse["decision"] == "kept"
    assert (worse["challenger_score"], worse["champion_score"]) == (0.38, 0.40)
    assert store.read_json(CURRENT)["run"] == store.uri_of("runs/r1")

    better = run_promote(spec, _finished_run(store, "r3", 0.20, 0.40), store.uri)
    assert better["decision"] == "promoted"
    current = store.read_json(CURRENT)
    assert current["run"] == store.uri_of("runs/r3")
    assert current["previous"] == store.uri_of("runs/r1")
    assert current["score"] == 0.20

    records = sorted(k for k in store.list(PROMOTIONS) if k.endswith(".json"))
    assert len(records) == 3
    decisions = [store.read_json(k) for k in records]
    assert [d["decision"] for d in decisions] == ["promoted", "kept", "promoted"]
    assert decisions[1]["champion"]["run"] == store.uri_of("runs/r1")
    assert decisions[1]["spec"]["promote"]["margin"] == 0.05
    assert all(d["time"] and d["metric"] == "cer" for d in decisions)


def test_a_champion_without_scores_on_this_heldout_set_is_an_error(store: Store) -> None:
    spec = _spec(store)
    run_promote(spec, _finished_run(store, "r1", 0.4, None), store.uri)
    with pytest.raises(ValueError, match=r"no models\.champion.*run infer with the champion"):
        run_promote(spec, _finished_run(store, "r2", 0.1, None), store.uri)
    assert store.read_json(CURRENT)["run"] == store.uri_of("runs/r1")


def test_promotion_root_defaults_to_the_parent_of_the_run() -> None:
    spec = parse_spec(
        {"run": {"uri": "s3://b/retrain/2026"}, "model": {"name": "m"}, "data": {"source": "d"}}
    )
    assert promotion_root(spec) == "s3://b/retrain"
    spec.promote.root = "s3://b/champions"
    assert promotion_root(spec) == "s3://b/champions"


def test_a_first_run_that_does_not_beat_its_base_model_leaves_no_champion(store: Store) -> None:
    kept = run_promote(_spec(store), _finished_run(store, "r1", 0.93, None, base=0.95), store.uri)

    assert kept["decision"] == "kept" and kept["base_score"] == 0.95
    assert not store.exists(CURRENT)
    (record,) = [store.read_json(k) for k in store.list(PROMOTIONS) if k.endswith(".json")]
    assert record["decision"] == "kept" and record["base_score"] == 0.95
