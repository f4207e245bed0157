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
