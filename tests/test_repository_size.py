"""The repository stays small enough to travel to the GPU machine.

A device call carries the tracked tree plus the wheel folders named in `carry`, 64 MiB in
all (docs/gpu.md). The largest folder, `.gpu-wheels/c` (Ray's first half and its small
dependencies), is ~44 MiB, so the tree must stay under ~19 MiB or the install cannot start.
Raw benchmark files are what grows it: keep their summaries, leave the raw files out.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREE_LIMIT_BYTES = 19 * 2**20


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_the_tracked_tree_leaves_room_for_the_largest_wheel_folder_in_one_device_call():
    sizes = {p: p.stat().st_size for p in _tracked_files() if p.is_file()}
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda kv: kv[1], reverse=True)[:5]
    listing = ", ".join(f"{p.relative_to(ROOT)} ({n / 2**20:.1f} MiB)" for p, n in largest)
    assert total <= TREE_LIMIT_BYTES, (
        f"tracked files take {total / 2**20:.1f} MiB, over {TREE_LIMIT_BYTES / 2**20:.0f} MiB: "
        f"a device call could no longer carry .gpu-wheels/c beside them. Largest: {listing}"
    )
