"""`vlm-ray <stage> --config job.yaml [dotted.key=value ...]` — the one command line of every stage.

`python -m jobs.<stage>` (what `ray job submit` runs) calls the same code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlm_ray.config import JobSpec, SpecError, describe_keys, load_spec


@dataclass(frozen=True)
class Stage:
    """A stage as the command line sees it."""

    target: str  # "module:function" taking a JobSpec, imported only when the stage runs
    summary: str
    details: str
    sections: tuple[str, ...]  # spec sections the stage reads (shown in --help)

    def load(self) -> Callable[[JobSpec], Any]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    "prepare": Stage(
        "vlm_ray.stages.prepare:run_prepare",
        "validate, decode, resize and shard the data into <run>/prepared/ (Ray tasks on CPUs)",
        "Reads data.source (HF dataset, parquet, JSONL + images, image folder; local or s3://), "
        "rejects bad rows into <run>/prepared/quarantine/ with a reason, resizes images into "
        "data.image_min_size..image_max_size snapped to the model's patch size, formats chat "
        "messages, splits train/held-out by a hash of each row's identity, and writes parquet "
        "shards + prepared/manifest.json. Re-running skips shards already written.",
        ("run", "model", "data", "ray"),
    ),
    "train": Stage(
        "vlm_ray.stages.train:run_train",
        "fine-tune the model on <run>/prepared/train/ in one Ray actor (Unsloth on GPU, HF+PEFT on CPU)",
        "train.engine=auto picks Unsloth (FastVisionModel + TRL SFTTrainer) where a CUDA GPU is "
        "present and transformers+PEFT otherwise; the log says which ran and why. Checkpoints go "
        "to <run>/checkpoints/ every train.save_steps; a restarted actor resumes from the last one. "
        "Writes <run>/model/adapter/ (and model/merged/ with save.merged_16bit), train/metrics.jsonl "
        "and train/loss.png.",
        ("run", "model", "lora", "train", "save", "ray"),
    ),
    "infer": Stage(
        "vlm_ray.stages.infer:run_infer",
        "caption/OCR images with a pool of Ray actors; one predictions file per input shard, exactly once",
        "By default predicts <run>/prepared/heldout/ with the base and the fine-tuned model "
        "(infer.models) into <run>/predictions/<base|finetuned>/, what evaluate scores. With "
        "infer.source set, captions any image source as a bulk job in <run>/bulk/<job>/ "
        "(input/ prepared, predictions/<tag>/; infer.job, default named after the source). "
        "Re-running skips finished shards.",
        ("run", "model", "generation", "infer", "ray"),
    ),
    "evaluate": Stage(
        "vlm_ray.stages.evaluate:run_evaluate",
        "score predictions (CER, WER, exact match, BLEU, chrF): base vs fine-tuned, report with plots",
        "Reads <run>/predictions/, writes <run>/eval/metrics.json, per_row.jsonl, report.md and PNG plots.",
        ("run", "eval"),
    ),
    "pipeline": Stage(
        "vlm_ray.pipeline:run_pipeline",
        "prepare -> train -> infer -> evaluate, each skipping work already committed",
        "Runs every stage in order on the same run URI and prints where the outputs are and the "
        "base vs fine-tuned table. Safe to resubmit: finished work is skipped.",
        ("run", "model", "lora", "data", "train", "save", "generation", "infer", "eval", "ray"),
    ),
    "retrain": Stage(
        "vlm_ray.retrain:run_retrain",
        "scheduled retraining: train a challenger, evaluate it against the champion, promote if better",
        "Prepares the new data, trains a challenger, evaluates it and the current champion "
        "(promote.root/current.json) on the same held-out set, and moves current.json only if the "
        "challenger beats the champion by promote.margin on eval.metric. The decision is recorded "
        "under promote.root/promotions/.",
        (
            "run",
            "model",
            "lora",
            "data",
            "train",
            "save",
            "generation",
            "infer",
            "eval",
            "promote",
            "ray",
        ),
    ),
}


PRINTING_COMMANDS = ("status", "spec")


def _keys_help(sections: tuple[str, ...]) -> str:
    rows = [r for r in describe_keys() if r[0].split(".")[0] in sections]
    lines = ["job spec keys (YAML sections, or dotted.key=value overrides):"]
    for key, default, desc in rows:
        lines.append(f"  {key} = {default}")
        if desc:
            lines.extend(
                textwrap.wrap(desc, width=92, initial_indent="      ", subsequent_indent="      ")
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per stage, plus helpers."""
    parser = argparse.ArgumentParser(
        prog="vlm-ray",
        description="Fine-tune vision-language models and run bulk captioning/OCR + evaluation on Ray.",
        epilog="Example: vlm-ray pipeline --config examples/demo.yaml run.uri=s3://bucket/runs/r1\n"
        "`vlm-ray <stage> --help` explains a stage and lists the spec keys it reads.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name, stage in STAGES.items():
        p = sub.add_parser(
            name,
            help=stage.summary,
            description=f"{stage.summary}.\n\n" + textwrap.fill(stage.details, 92),
            epilog=_keys_help(stage.sections),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", "-c", help="Job spec YAML (see examples/).")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="Override spec keys, e.g. train.max_steps=10 lora.r=8",
        )
    spec_p = sub.add_parser(
        "spec", help="validate a job spec and print it with every default filled in"
    )
    spec_p.add_argument("--config", "-c")
    spec_p.add_argument("overrides", nargs="*", metavar="key=value")
    status_p = sub.add_parser(
        "status",
        help="what the run at run.uri has done so far, read from its object storage",
        description=(
            "Reads the run's manifests, commit markers and checkpoints (no cluster needed, "
            "nothing written) and prints one line per stage: done, partial (running, or "
            "interrupted: re-running resumes) or not started, with its numbers."
        ),
    )
    status_p.add_argument(
        "--config", "-c", help="The run's job spec (a local copy of <run>/spec.yaml works too)."
    )
    status_p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. run.uri=s3://bucket/runs/r1"
    )
    status_p.add_argument("--json", action="store_true", help="Print the status as JSON.")
    tiny = sub.add_parser(
        "tiny-model",
        help="build a random-weight model of a supported family (no hub access needed)",
    )
    tiny.add_argument("--family", default="qwen2_vl")
    tiny.add_argument("--size", default="tiny")
    tiny.add_argument("--out", required=True)
    demo = sub.add_parser(
        "demo-assets",
        help="build the demo's tiny model and digits dataset (what examples/demo.yaml points at)",
    )
    demo.add_argument("--root", default=".cache/demo")
    return parser


def setup_logging(verbose: bool = False, stream: Any = None) -> None:
    """One format for every stage: time, level, module, message; to stdout unless `stream`."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=stream or sys.stdout,
        force=True,
    )
    for noisy in (
        "urllib3",
        "botocore",
        "boto3",
        "s3transfer",
        "filelock",
        "PIL",
        "matplotlib",
        "httpx",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vlm-ray` console script and of `python -m jobs.<stage>`."""
    args = build_parser().parse_args(argv)
    # Commands whose stdout is their answer (JSON, YAML) log to stderr, so it can be piped.
    setup_logging(args.verbose, sys.stderr if args.stage in PRINTING_COMMANDS else None)
    log = logging.getLogger("vlm_ray")
    if args.stage == "tiny-model":
        from vlm_ray.models.tiny import build_tiny_model

        print(build_tiny_model(args.out, args.family, args.size))
        return 0
    if args.stage == "demo-assets":
        from vlm_ray.demo import build_demo_assets

        build_demo_assets(args.root)
        return 0
    try:
        spec = load_spec(args.config, args.overrides)
    except (SpecError, FileNotFoundError) as err:
        print(f"vlm-ray: {err}", file=sys.stderr)
        return 2
    if args.stage == "status":
        import json

        from vlm_ray.operator_errors import operator_message
        from vlm_ray.run_status import format_status, run_status

        try:
            status = run_status(spec)
        except Exception as err:
            message = operator_message(err)
            if message is None:
                raise
            log.debug("status failed", exc_info=True)
            print(f"vlm-ray status: {message}", file=sys.stderr)
            return 1
        print(json.dumps(status, indent=1) if args.json else format_status(status))
        return 0
    if args.stage == "spec":
        import yaml

        print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        return 0
    stage = STAGES[args.stage]
    start = time.time()
    log.info("%s: starting (run %s)", args.stage, spec.run.uri)
    try:
        stage.load()(spec)
    except SpecError as err:
        print(f"vlm-ray {args.stage}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from vlm_ray.operator_errors import operator_message

        failed = f"{args.stage}: failed after {time.time() - start:.1f} s (run {spec.run.uri})"
        message = operator_message(err)
        if message is None:  # a bug or an unforeseen failure: its traceback helps
            log.exception(failed)
            return 1
        # Something to fix outside the code: one sentence (the traceback with -v).
        log.debug(failed, exc_info=True)
        log.error("%s: %s", failed, message)
        return 1
    log.info("%s: done in %.1f s; outputs under %s", args.stage, time.time() - start, spec.run.uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
