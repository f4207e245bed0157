"""The path CI pipelines use: a real Ray head started with `ray start --head`, the demo job sent
with the Ray job submission API (`ray job submit --working-dir .` does the same), its outputs
checked, and only this head stopped afterwards.

Ray >= 2.59 turns token authentication on for local clusters: the head and the client share
a token through RAY_AUTH_MODE=token / RAY_AUTH_TOKEN, as a CI pipeline would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlm_ray import layout
from vlm_ray.storage import open_store

ROOT = Path(__file__).parent.parent
RAY = str(Path(sys.executable).parent / "ray")
EXCLUDES = [
    ".venv",
    ".git",
    ".cache",
    ".gpu",
    ".gpu-wheels",
    "runs",
    "*.egg-info",
    "**/__pycache__",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head of our own (own temp dir, ports and token); yields (job API address, client env)."""
    temp_dir = tmp_path_factory.mktemp("ray")
    dashboard = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        # The job's `python` is the head's: this environment's, as with an activated venv.
        "PATH": f"{Path(RAY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)  # this head, not a cluster another test connected to
    # Every fixed default port is chosen here, so this head never meets another one on the machine.
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    cmd += [f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
    cmd += [f"--ray-client-server-port={_free_port()}", "--num-cpus=2", "--num-gpus=0"]
    cmd += [f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp_dir}"]
    cmd += ["--disable-usage-stats"]
    log = (temp_dir / "ray-start.log").open("w")
    # --block keeps `ray start` in the foreground: stopping it stops this head's processes only
    # (its own process group), never another Ray on the machine as a bare `ray stop` would.
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while _ray(env, "job", "list", "--address", address).returncode != 0:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {(temp_dir / 'ray-start.log').read_text()[-2000:]}")
            assert time.time() < deadline, "the Ray head's job API did not come up in 120 s"
            time.sleep(1)
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of this head's group still running
        log.close()


def _ray(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `ray` command line, in its own process (as CI runs it), with the head's token."""
    return subprocess.run(
        [RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _submit_and_wait(head: tuple[str, dict[str, str]], args: list[str]) -> tuple[str, str]:
    """`ray job submit --working-dir <checkout> -- python -m jobs.pipeline <args>`; (status, logs)."""
    address, env = head
    job_id = f"vlm-ray-test-{secrets.token_hex(4)}"
    runtime_env = {
        "excludes": EXCLUDES,
        "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    }
    submit = _ray(
        env,
        *("job", "submit", "--address", address, "--submission-id", job_id),
        *("--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env)),
        *("--", "python", "-m", "jobs.pipeline", *args),
        timeout=400,
    )
    assert job_id in submit.stdout + submit.stderr, submit.stderr[-3000:]
    status = _ray(env, "job", "status", "--address", address, job_id)
    found = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)", status.stdout + status.stderr)
    assert found, status.stdout + status.stderr
    outcome = found.group(1).upper()
    logs = _ray(env, "job", "logs", "--address", address, job_id).stdout
    # The CLI's exit code follows the job's outcome: what a CI step relies on.
    assert (submit.returncode == 0) == (outcome == "SUCCEEDED"), submit.stderr[-2000:]
    return outcome, logs


@pytest.fixture(scope="module")
def demo_inputs(quick_demo_overrides: list[str]) -> list[str]:
    """Overrides that shrink examples/demo.yaml to a few-second run on 2 CPUs."""
    return quick_demo_overrides


def test_demo_job_submitted_to_a_ray_head_succeeds_and_resumes(
    ray_head: tuple[str, dict[str, str]], demo_inputs: list[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = ["--config", "examples/demo.yaml", f"run.uri={run}", *demo_inputs]
    status, logs = _submit_and_wait(ray_head, args)
    assert status == "SUCCEEDED", logs[-4000:]
    store = open_store(str(run))
    assert f"Run {store.uri}" in logs, "the job prints where its outputs went"
    metrics = store.read_json(layout.EVAL_METRICS)
    assert set(metrics["models"]) >= {"base", "finetuned"} and metrics["rows"] > 0
    assert store.exists(layout.MODEL_INFO) and store.exists(layout.EVAL_REPORT)
    first_manifest = store.read_bytes(layout.PREPARED_MANIFEST)
    first_model = store.read_bytes(layout.MODEL_INFO)

    # Resubmitting the same run is safe: committed work is skipped, not redone or duplicated.
    status, logs = _submit_and_wait(ray_head, args)
    assert status == "SUCCEEDED", logs[-4000:]
    assert store.read_bytes(layout.PREPARED_MANIFEST) == first_manifest
    assert store.read_bytes(layout.MODEL_INFO) == first_model
    assert store.read_json(layout.EVAL_METRICS)["rows"] == metrics["rows"]


def test_a_bad_job_spec_fails_the_job_with_a_message_naming_the_field(
    ray_head: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    args = ["--config", "examples/demo.yaml", f"run.uri={tmp_path}/run", "lora.r=0"]
    status, logs = _submit_and_wait(ray_head, args)
    assert status == "FAILED"
    assert "lora.r" in logs and "greater than or equal to 1" in logs
