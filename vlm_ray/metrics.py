"""Scoring predictions against references: CER/WER (jiwer), exact match, BLEU/chrF (sacrebleu).

Scales: ``cer``, ``wer`` and ``exact_match`` are fractions (CER and WER can
exceed 1 when the prediction is longer than the reference); ``bleu`` and
``chrf`` are sacrebleu's 0-100. A promotion margin is in the metric's own unit.
Texts are normalised the same way on both sides first (spec ``eval``: strip,
collapse_whitespace, lowercase).
"""

from __future__ import annotations

from typing import Any

import jiwer
from sacrebleu.metrics import BLEU, CHRF

from vlm_ray.config import EvalSpec

METRICS = ("cer", "wer", "exact_match", "bleu", "chrf")
LOWER_IS_BETTER = frozenset({"cer", "wer"})

# effective_order: OCR answers are often shorter than 4 words; plain corpus BLEU
# scores a corpus of one-word answers 0 even when every one is right. With enough
# text every n-gram order matches and this is the standard corpus BLEU.
_BLEU = BLEU(effective_order=True)
_CHRF = CHRF()


def _normaliser(opts: EvalSpec) -> jiwer.Compose:
    steps: list[Any] = []
    if opts.collapse_whitespace:
        steps.append(jiwer.SubstituteRegexes({r"\s+": " "}))
    if opts.strip:
        steps.append(jiwer.Strip())
    if opts.lowercase:
        steps.append(jiwer.ToLowerCase())
    return jiwer.Compose(steps)


def normalize_text(text: str | None, opts: EvalSpec) -> str:
    """The text as it is scored: None becomes "", then the spec's strip / collapse / lowercase."""
    return _normaliser(opts)(text or "")


def _cer(reference: str, prediction: str) -> float:
    # jiwer counts insertions against an empty reference (it cannot divide by 0 chars).
    return float(jiwer.cer(reference, prediction))


def _wer(reference: str, prediction: str) -> float:
    if not reference.strip():
        # jiwer.wer has no words to align against; any predicted word is wholly wrong.
        return 0.0 if not prediction.strip() else 1.0
    return float(jiwer.wer(reference, prediction))


def score_row(prediction: str | None, reference: str, opts: EvalSpec) -> dict[str, float]:
    """Per-row scores {cer, wer, exact_match} of one prediction (None = empty) after normalisation."""
    norm = _normaliser(opts)
    pred, ref = norm(prediction or ""), norm(reference)
    return {
        "cer": _cer(ref, pred),
        "wer": _wer(ref, pred),
        "exact_match": float(pred == ref),
    }


def score_rows(predictions: list[str], references: list[str], opts: EvalSpec) -> dict[str, float]:
    """Corpus-level {cer, wer, exact_match, bleu, chrf, rows}: edit counts summed over all rows, not averaged."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: score them row by row in pairs"
        )
    if not predictions:
        raise ValueError("no rows to score: need at least one prediction with a reference")
    norm = _normaliser(opts)
    preds = [norm(p or "") for p in predictions]
    refs = [norm(r or "") for r in references]
    # jiwer cannot align a corpus whose references are all empty; score those rows one by one.
    words = (
        float(jiwer.wer(refs, preds))
        if all(r.strip() for r in refs)
        else _corpus_wer_with_empty_refs(refs, preds)
    )
    return {
        "cer": float(jiwer.cer(refs, preds)),
        "wer": words,
        "exact_match": sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs),
        "bleu": float(_BLEU.corpus_score(preds, [refs]).score),
        "chrf": float(_CHRF.corpus_score(preds, [refs]).score),
        "rows": len(refs),
    }


def _corpus_wer_with_empty_refs(refs: list[str], preds: list[str]) -> float:
    """Corpus WER where some references have no words: their predicted words count as insertions."""
    scored = [(r, p) for r, p in zip(refs, preds, strict=True) if r.strip()]
    insertions = sum(len(p.split()) for r, p in zip(refs, preds, strict=True) if not r.strip())
    if not scored:
        return 0.0 if insertions == 0 else float(insertions)
    out = jiwer.process_words([r for r, _ in scored], [p for _, p in scored])
    edits = out.substitutions + out.deletions + out.insertions + insertions
    return edits / (out.hits + out.substitutions + out.deletions)


def is_better(metric: str, challenger: float, champion: float, margin: float) -> bool:
    """True if challenger beats champion on metric by at least margin (lower wins for cer/wer)."""
    if metric not in METRICS:
        raise ValueError(
            f"unknown metric {metric!r}: eval.metric must be one of {', '.join(METRICS)}"
        )
    if metric in LOWER_IS_BETTER:
        return challenger <= champion - margin and challenger < champion
    return challenger >= champion + margin and challenger > champion


def improvement(metric: str, base: float, finetuned: float) -> float:
    """How much better finetuned is than base on metric: positive = better, in the metric's unit."""
    return base - finetuned if metric in LOWER_IS_BETTER else finetuned - base
