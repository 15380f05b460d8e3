"""Answer metrics on inputs whose values are worked out by hand."""

from __future__ import annotations

import math

import pytest

from appliance.quality.metrics import answer_metrics, bleu, exact_match, normalize, perplexity, rouge_l, token_f1


def test_normalisation_and_exact_match():
    assert normalize("  The Cat, sat!  ") == "cat sat"
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("a dog", "cat") == 0.0


def test_token_f1_by_hand():
    # [cat, sat] against [cat, sat, down]: 2 common, precision 1, recall 2/3 -> F1 0.8
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0


def test_rouge_l_by_hand():
    # LCS of "a b c d" and "a c d e" is "a c d": precision 3/4, recall 3/4, F 0.75
    assert rouge_l(["w1 w2 w3 w4"], ["w1 w3 w4 w5"]) == pytest.approx(0.75)
    assert rouge_l(["w1 w2 w3 w4", "x"], ["w1 w3 w4 w5", "x"]) == pytest.approx((0.75 + 1.0) / 2)


def test_bleu_by_hand():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=0.01)
    assert bleu(["the cat is on the mat"], ["the cat is on the mat"]) == pytest.approx(100.0)


def test_perplexity_and_the_bundle():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    report = answer_metrics(["The cat.", "dog"], ["cat", "cat"])
    assert report["examples"] == 2 and report["exact_match"] == 0.5 and report["token_f1"] == 0.5
    assert answer_metrics([], []) == {"examples": 0}
