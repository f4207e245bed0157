"""Durations written for a person reading a progress or status line."""

from __future__ import annotations


def rough_duration(seconds: float) -> str:
    """Roughly, for a person: '~40 s', '~12 min', '~3.5 h'."""
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
