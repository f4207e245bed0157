"""The train engines run no Python shipped with a model unless the spec says model.trust_remote_code=true."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm_ray.config import parse_spec
from vlm_ray.models.families import family_of
from vlm_ray.train.hf_engine import load_hf_model


@pytest.fixture
def folder_needing_remote_code(tiny_qwen2_vl: Path, tmp_path: Path) -> Path:
    """The tiny Qwen2-VL, but its config.json maps the Auto classes to Python files (auto_map)."""
    folder = tmp_path / "remote_model"
    folder.mkdir()
    for f in tiny_qwen2_vl.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((tiny_qwen2_vl / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForImageTextToText": "modeling_custom.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hf_engine_refuses_a_model_folder_with_remote_code_unless_trusted(
    folder_needing_remote_code: Path,
):
    spec = parse_spec({"model": {"name": str(folder_needing_remote_code)}, "data": {"source": "x"}})
    assert not spec.model.trust_remote_code
    with pytest.raises(ValueError, match=r"auto_map.*set model\.trust_remote_code=true"):
        load_hf_model(spec, str(folder_needing_remote_code), family_of(folder_needing_remote_code))
