"""infer.defer_stop_check: transformers' deferred stop check, switched on for CUDA.

Each decoding step of `generate` asks whether every sequence has finished
(`unfinished_sequences.max() == 0`) and reads the answer on the host, which waits for the
device to finish the step before the next one can be queued. Inference run 14 (2B shape,
batch 512, H100) measured 31 steps in 0.39 s with ~8 ms of GPU work each: the rest is that
wait and the host's launches that follow it.

transformers (5.x) ships the fix, `DeferredStopCheck`: the flag is copied asynchronously and
read one step late, so the host queues step n+1 while step n runs; when a stop is seen late,
the one extra step is undone (its tokens and its cache entries). Upstream turns it on for
Apple's MPS only ("we should enable it for cuda if we observe perf gains"). This turns it on
for CUDA too, with upstream's other conditions unchanged; the generated tokens are the same.
The CPU has nothing to gain (no device to wait for) and no events to defer with, so it keeps
the plain check.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DEVICES = ("cuda", "mps")
_original: Any = None


def enable_deferred_stop_check() -> bool:
    """Let transformers defer the per-step stop check on CUDA (process-wide, idempotent).

    False when this transformers has no DeferredStopCheck (then generation is unchanged).
    """
    global _original
    try:
        from transformers.generation.utils import DeferredStopCheck
    except ImportError:
        log.warning("infer.defer_stop_check: this transformers has no DeferredStopCheck; ignored")
        return False
    if _original is not None:
        return True
    _original = DeferredStopCheck.is_supported

    def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
        if device.type not in DEVICES:
            return False
        # Upstream's own conditions (assisted decoding, a cache that must be rolled back), as if
        # the device were MPS.
        import torch

        return _original(torch.device("mps"), cache, cache_is_returned, is_assistant)

    DeferredStopCheck.is_supported = staticmethod(is_supported)
    return True


def disable_deferred_stop_check() -> None:
    """Undo enable_deferred_stop_check (for tests and benchmarks' A/B)."""
    global _original
    if _original is None:
        return
    from transformers.generation.utils import DeferredStopCheck

    DeferredStopCheck.is_supported = staticmethod(_original)
    _original = None
