"""bench/device_chains.sh runs one chain of commands per GPU at once and packs what they wrote."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "bench" / "device_chains.sh"


def _run_chains(out: Path, *chains: Path, **env: str) -> subprocess.CompletedProcess:
    """bench/device_chains.sh on these chain files, results under `out`, with only `env` set."""
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, chains)],
        env={"OUT": str(out), "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_chains_run_in_parallel_log_exit_codes_and_pack_the_results(tmp_path):
    marker = tmp_path / "first-chain-started"
    first = tmp_path / "gpu0.txt"
    first.write_text(
        "# a comment, then a blank line\n\n"
        f"touch {marker}\n"
        'echo "RESULT {\\"gpu\\": \\"$CUDA_VISIBLE_DEVICES\\"}" > $R/gpu0.json\n'
    )
    second = tmp_path / "gpu1.txt"
    # Waits for the first chain: they run at once, not one after the other.
    second.write_text(f"until [ -e {marker} ]; do sleep 0.1; done\nexit 3\n")
    out = tmp_path / "out"

    done = _run_chains(out, first, second)

    assert "[2] exit 0" in (out / "r" / "chain0.log").read_text()
    chain1 = (out / "r" / "chain1.log").read_text()
    assert "[1] exit 0" in chain1 and "[2] exit 3" in chain1, "each command's own exit code"
    assert (out / "r" / "gpu0.json").read_text().strip() == 'RESULT {"gpu": "0"}'
    with tarfile.open(out / "results.tgz") as archive:
        names = set(archive.getnames())
    assert {"r/gpu0.json", "r/chain0.log", "r/chain1.log", "r/chain1_2.log"} <= names
    assert "chain 1 done" in done.stdout


def test_chains_still_running_at_the_deadline_are_stopped_and_the_results_still_packed(tmp_path):
    chain = tmp_path / "gpu0.txt"
    chain.write_text("echo early > $R/early.txt\nsleep 120\necho never > $R/late.txt\n")
    out = tmp_path / "out"

    _run_chains(out, chain, CHAIN_DEADLINE="2")  # 60 s limit: less than the sleep

    log = (out / "r" / "chain0.log").read_text()
    assert "stopped at CHAIN_DEADLINE=2s" in log
    assert not (out / "r" / "late.txt").exists()
    with tarfile.open(out / "results.tgz") as archive:
        assert "r/early.txt" in archive.getnames()


def test_skip_leaves_out_the_commands_it_matches_and_says_so(tmp_path):
    chain = tmp_path / "gpu0.txt"
    chain.write_text(
        "python3 bench/infer_speed.py --shape 2b --modes b --batch-sizes 512 > $R/baseline.txt\n"
        "echo ours > $R/ours.txt\n"
    )
    out = tmp_path / "out"

    _run_chains(out, chain, SKIP="--modes b ")

    log = (out / "r" / "chain0.log").read_text()
    assert "[1] skipped (SKIP): python3 bench/infer_speed.py --shape 2b --modes b" in log
    assert "[2] exit 0" in log
    assert not (out / "r" / "baseline.txt").exists()
    assert (out / "r" / "ours.txt").read_text() == "ours\n"
