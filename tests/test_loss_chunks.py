"""train.loss_chunks reaches Unsloth's fused cross-entropy, before or after Unsloth is imported."""

from __future__ import annotations

import os
import types

from vlm_ray.train.unsloth_engine import set_loss_chunks

MODULE = "unsloth_zoo.fused_losses.cross_entropy_loss"


def test_chunks_go_to_the_environment_and_to_an_already_imported_loss_module(monkeypatch):
    monkeypatch.delenv("UNSLOTH_CE_LOSS_N_CHUNKS", raising=False)
    loaded = types.ModuleType(MODULE)
    loaded.N_CHUNKS = None  # what the module read from the environment at import
    monkeypatch.setitem(__import__("sys").modules, MODULE, loaded)

    set_loss_chunks(4)

    assert os.environ["UNSLOTH_CE_LOSS_N_CHUNKS"] == "4"
    assert loaded.N_CHUNKS == "4"


def test_no_setting_leaves_unsloth_s_own_choice(monkeypatch):
    monkeypatch.delenv("UNSLOTH_CE_LOSS_N_CHUNKS", raising=False)
    set_loss_chunks(None)
    assert "UNSLOTH_CE_LOSS_N_CHUNKS" not in os.environ
