"""`vlm-ray status`: a run's state read back from its object storage alone, finished or not.

The finished case is checked at the end of tests/test_pipeline_e2e.py (a folder and S3); here
the states in between: work committed part way, checkpoints without a trained model.
"""

from __future__ import annotations

import json
import re
import time

from test_infer_loading import infer_spec

from vlm_ray import layout
from vlm_ray.cli import main
from vlm_ray.ledger import ShardLedger
from vlm_ray.run_status import format_status, run_status
from vlm_ray.train.checkpoints import upload_checkpoint


def _states(status: dict) -> dict[str, str]:
    return {s["stage"]: s["state"] for s in status["stages"]}


def test_an_empty_run_has_nothing_started(store):
    status = run_status(infer_spec(store.uri, "unused", endpoint=_endpoint(store)))

    # Four stages: no promotion line for a run that is no retraining (no promote.root, no decision).
    assert _states(status) == dict.fromkeys(
        ["prepare", "train", "infer", "evaluate"], "not started"
    )
    assert "no input shards yet (run prepare)" in format_status(status)


def test_a_run_interrupted_part_way_shows_what_is_committed(store, write_prepared, tmp_path):
    write_prepared(store, rows=6, heldout=6, rows_per_shard=3)  # two held-out shards
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "trainer_state.json").write_text("{}")
    upload_checkpoint(store, tmp_path / "ckpt", step=20, keep=2)
    # What train/metrics_log.py flushes while training: one line per logging step.
    now = time.time()
    lines = [{"step": 20, "loss": 0.7, "time": now}, {"step": 25, "loss": 0.5, "time": now}]
    store.write_text(layout.TRAIN_METRICS, "".join(json.dumps(r) + "\n" for r in lines))
    ShardLedger(store, layout.predictions_dir("base")).commit(
        "shard-00000", {"rows": 3, "errors": 1, "seconds": 1.5}
    )
    spec = infer_spec(store.uri, "unused", endpoint=_endpoint(store), train={"max_steps": 60})

    status = run_status(spec)

    assert _states(status) == {
        "prepare": "done",
        "train": "partial",
        "infer": "partial",
        "evaluate": "not started",
    }
    stages = {s["stage"]: s for s in status["stages"]}
    assert stages["train"]["facts"] == {
        "last_logged_step": 25,
        "last_loss": 0.5,
        "last_checkpoint_step": 20,
    }
    # "N s ago": the seconds since the last logged line's time (a slow store makes it 1 or 2)
    assert re.match(
        r"step 25/60 logged \(loss 0\.5, ~\d s ago\); last checkpoint at step 20",
        stages["train"]["detail"],
    )
    assert stages["infer"]["facts"]["models"] == {
        # 3 rows in the 1.5 s the one committed shard took: 2 images/s, one shard of 3 left
        "base": {"shards_done": 1, "shards": 2, "rows": 3, "errors": 1, "images_per_s": 2.0},
        "finetuned": {"shards_done": 0, "shards": 2, "rows": 0, "errors": 0},
    }
    assert (
        "base 1/2 shards, 3 rows (1 errors), 2.0 images/s: ~2 s of work left"
        in (stages["infer"]["detail"])
    )


def test_the_command_prints_lines_or_json(store, write_prepared, capsys, tmp_path):
    write_prepared(store, rows=2, heldout=2)
    spec = tmp_path / "job.yaml"
    endpoint = _endpoint(store)
    spec.write_text(
        f"run: {{uri: '{store.uri}'{f', s3_endpoint_url: {endpoint}' if endpoint else ''}}}\n"
        "model: {name: unused}\ndata: {source: unused}\n"
    )

    assert main(["status", "--config", str(spec)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"run {store.uri_of('')}"
    assert lines[1].split()[:2] == ["prepare", "done"]

    assert main(["status", "--config", str(spec), "--json"]) == 0
    assert _states(json.loads(capsys.readouterr().out))["prepare"] == "done"


def _endpoint(store) -> str | None:
    return getattr(store, "endpoint_url", None)


def test_an_image_source_not_yet_prepared_says_infer_will_prepare_it(tmp_path):
    spec = infer_spec(str(tmp_path / "run"), "unused", infer={"source": str(tmp_path / "images")})

    (infer,) = [s for s in run_status(spec)["stages"] if s["stage"] == "infer"]

    assert infer["state"] == "not started"
    assert infer["detail"] == "no input shards yet (infer prepares infer.source first)"


def test_a_first_shard_and_first_logged_steps_count_as_partial_and_stale_markers_do_not_count(
    store, write_prepared
):
    write_prepared(store, rows=6, heldout=6, rows_per_shard=3)  # held-out shards 00000, 00001
    ledger = ShardLedger(store, layout.predictions_dir("base"))
    ledger.commit("shard-00000", {"rows": 3, "errors": 0})
    ledger.commit("shard-00007", {"rows": 9, "errors": 0})  # from an input that is gone
    store.write_text(
        layout.TRAIN_METRICS, json.dumps({"step": 5, "epoch": 0.25, "loss": 2.0}) + "\n"
    )
    spec = infer_spec(store.uri, "unused", endpoint=_endpoint(store), infer={"models": ["base"]})

    stages = {s["stage"]: s for s in run_status(spec)["stages"]}

    assert stages["infer"]["state"] == "partial"
    assert stages["infer"]["facts"]["models"]["base"] == {
        "shards_done": 1,
        "shards": 2,
        "rows": 3,
        "errors": 0,
    }
    assert stages["train"]["state"] == "partial"
    # Trained by epochs (num_train_epochs, default 1): where in them it got to
    assert stages["train"]["detail"].startswith(
        "step 5 (epoch 0.25/1) logged (loss 2); no checkpoint yet"
    )
