"""The command line: --help explains each stage; a bad spec stops before anything starts, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlm_ray.cli import STAGES, main

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help_explains_the_stage_and_lists_its_keys(
    stage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert STAGES[stage].summary in out
    assert "run.uri" in out


def test_help_for_train_shows_the_unsloth_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for knob in (
        "lora.finetune_vision_layers",
        "model.load_in_4bit",
        "train.train_on_responses_only",
        "train.engine",
    ):
        assert knob in out


def test_invalid_spec_exits_2_naming_the_field_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    code = main(
        [
            "pipeline",
            "--config",
            str(ROOT / "examples/demo.yaml"),
            f"run.uri={run_dir}",
            "lora.r=-3",
        ]
    )
    assert code == 2
    assert "lora.r" in capsys.readouterr().err
    assert not run_dir.exists()


def test_missing_config_file_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "--config", "does/not/exist.yaml"]) == 2
    assert "does/not/exist.yaml" in capsys.readouterr().err


def test_jobs_entry_point_is_the_same_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "usage: vlm-ray pipeline" in out


def test_spec_subcommand_prints_the_validated_spec_with_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["spec", "--config", str(ROOT / "examples/demo.yaml"), "lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out and "finetune_mlp_modules: true" in out


def _failed_status_on_s3(run_uri: str, endpoint: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`vlm-ray status` of the demo spec at run_uri on the test S3 server, which must fail with
    exit code 1 and no traceback; what it printed on stderr."""
    config = str(ROOT / "examples/demo.yaml")
    code = main(
        ["status", "--config", config, f"run.uri={run_uri}", f"run.s3_endpoint_url={endpoint}"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    return err


def test_a_bucket_that_does_not_exist_is_one_sentence_not_a_traceback(
    s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _failed_status_on_s3("s3://no-such-bucket/runs/r1", s3_endpoint, capsys)

    assert "vlm-ray status: S3 bucket no-such-bucket does not exist" in err


def test_missing_s3_credentials_are_named_with_the_variables_to_set(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup either
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")

    err = _failed_status_on_s3("s3://vlm-ray-test/runs/r1", s3_endpoint, capsys)

    assert "no credentials for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err


def test_a_stage_run_before_the_one_it_reads_from_says_which_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", "--config", str(ROOT / "examples/demo.yaml"), f"run.uri={tmp_path}"])

    log = capsys.readouterr().out  # a stage logs to stdout, its error line too
    assert code == 1
    assert "ERROR vlm_ray: evaluate: failed after" in log
    assert f"no predictions under file://{tmp_path}/predictions/<tag>/shard-*.jsonl" in log
    assert "run the infer stage first" in log
    assert "Traceback" not in log
