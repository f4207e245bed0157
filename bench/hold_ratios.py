"""The ratio table of one hold's inference runs, for docs/benchmarks.md.

    python -m bench.hold_ratios bench/results/infer/run16/*/r/*.jsonl

Every plain-HF line (mode b) of the files is a baseline, every other line a setup; each setup's
rate (the same one plot_results.py draws: a shared-GPU pool's rate once all its actors were
warm) is divided by the fastest baseline and by each baseline. The fastest is the one a target
is judged against, so that a slow baseline call never meets it. Give only files of one hold
(one machine, held without a break): ratios across holds mix machines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.plot_results import infer_bars


def hold_ratios(paths: list[Path]) -> tuple[list[float], list[tuple[str, float, list[float]]]]:
    """(baselines' images/s, [(setup, images/s, its ratio to each baseline)]) in file order."""
    labels, speed, _ = infer_bars(paths)
    baselines = [s for label, s in zip(labels, speed, strict=True) if label.startswith("(b)")]
    setups = [
        (label.replace("\n", " "), s, [round(s / b, 2) for b in baselines])
        for label, s in zip(labels, speed, strict=True)
        if not label.startswith("(b)")
    ]
    return baselines, setups


def markdown(baselines: list[float], setups: list[tuple[str, float, list[float]]]) -> str:
    """The table: each setup against the fastest baseline, then against each in file order."""
    if not baselines:
        raise SystemExit("hold_ratios: no plain-HF line (--modes b) in these files: no baseline")
    fastest = max(baselines)
    each = " / ".join(f"{b:g}" for b in baselines)
    rows = [
        f"| setup | images/s | × fastest HF ({fastest:g}) | × each HF ({each}) |",
        "|---|---|---|---|",
    ]
    for label, rate, ratios in setups:
        rows.append(
            f"| {label} | {rate:g} | {rate / fastest:.2f} | {' / '.join(f'{r:.2f}' for r in ratios)} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "inputs", nargs="+", type=Path, help="infer_speed.py JSON-lines files of one hold"
    )
    print(markdown(*hold_ratios(p.parse_args().inputs)))


if __name__ == "__main__":
    main()
