"""Metrics against hand-computed examples: CER/WER (jiwer), exact match, BLEU/chrF (sacrebleu), and the promotion comparison."""

from __future__ import annotations

import pytest

from vlm_ray.config import EvalSpec
from vlm_ray.metrics import improvement, is_better, normalize_text, score_row, score_rows

RAW = EvalSpec(strip=False, collapse_whitespace=False, lowercase=False)


def test_cer_of_kitten_vs_sitting_is_three_edits_over_six_characters() -> None:
    # k->s, e->i, +g: 3 edits over the 6 characters of the reference "kitten"
    assert score_row("sitting", "kitten", EvalSpec())["cer"] == pytest.approx(3 / 6)


def test_wer_counts_one_substituted_word_of_three() -> None:
    row = score_row("the dog sat", "the cat sat", EvalSpec())
    assert row["wer"] == pytest.approx(1 / 3)
    assert row["exact_match"] == 0.0


def test_exact_match_follows_the_normalisation_options() -> None:
    pred, ref = "  Hello   World \n", "hello world"
    assert score_row(pred, ref, RAW)["exact_match"] == 0.0
    assert (
        score_row(pred, ref, EvalSpec(lowercase=False))["exact_match"] == 0.0
    )  # case still differs
    assert score_row(pred, ref, EvalSpec(lowercase=True))["exact_match"] == 1.0
    assert normalize_text(pred, EvalSpec(lowercase=True)) == "hello world"
    assert normalize_text(" a\t\tb ", EvalSpec(strip=False)) == " a b "


def test_bleu_and_chrf_of_identical_texts_are_100_even_for_one_word_answers() -> None:
    for texts in (["the cat sat on the mat", "a dog"], ["7", "12"]):
        out = score_rows(texts, texts, EvalSpec())
        assert out["bleu"] == pytest.approx(100.0)
        assert out["chrf"] == pytest.approx(100.0)
        assert (out["cer"], out["wer"], out["exact_match"], out["rows"]) == (0.0, 0.0, 1.0, 2)


def test_corpus_cer_sums_edits_over_all_rows_rather_than_averaging_rows() -> None:
    # row 1: 0 edits / 4 chars; row 2: 2 edits / 2 chars -> 2 / 6, not mean(0, 1) = 0.5
    out = score_rows(["abcd", "xy"], ["abcd", "ab"], EvalSpec())
    assert out["cer"] == pytest.approx(2 / 6)
    assert out["exact_match"] == pytest.approx(0.5)


def test_a_missing_prediction_scores_as_every_character_deleted() -> None:
    row = score_row(None, "abc def", EvalSpec())
    assert (row["cer"], row["wer"], row["exact_match"]) == (1.0, 1.0, 0.0)


def test_rows_with_an_empty_reference_count_predicted_words_as_insertions() -> None:
    # row 1: "x" against nothing = 1 insertion; row 2: 2 words right -> 1 edit / 2 reference words
    out = score_rows(["x", "a b"], ["", "a b"], EvalSpec())
    assert out["wer"] == pytest.approx(1 / 2)
    assert score_row("", "", EvalSpec()) == {"cer": 0.0, "wer": 0.0, "exact_match": 1.0}


def test_score_rows_refuses_unpaired_lists() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_rows(["a", "b"], ["a"], EvalSpec())


def test_lower_is_better_for_error_rates_and_higher_for_scores() -> None:
    assert is_better("cer", 0.10, 0.20, margin=0.05)
    assert not is_better("cer", 0.18, 0.20, margin=0.05)
    assert not is_better("wer", 0.20, 0.20, margin=0.0)
    assert is_better("bleu", 31.0, 30.0, margin=0.5)
    assert not is_better("exact_match", 0.80, 0.90, margin=0.0)
    assert improvement("cer", base=0.5, finetuned=0.2) == pytest.approx(0.3)
    assert improvement("chrf", base=40.0, finetuned=30.0) == pytest.approx(-10.0)


def test_an_unknown_metric_names_the_spec_field() -> None:
    with pytest.raises(ValueError, match=r"eval\.metric must be one of cer, wer"):
        is_better("accuracy", 1.0, 0.0, margin=0.0)
