"""Metrics on hand-checked examples."""

import pytest

from train.metrics import normalize_answer, score


def test_rouge_hand_checked():
    # pred/ref share 5 of 6 unigrams, 3 of 5 bigrams; LCS "the cat on the mat" = 5
    r = score("rouge", ["The cat sat on the mat."], ["the cat was on the mat"])
    assert r["rouge1"] == pytest.approx(100 * 5 / 6)
    assert r["rouge2"] == pytest.approx(100 * 3 / 5)
    assert r["rougeL"] == pytest.approx(100 * 5 / 6)
    # P = 1/1, R = 1/4 -> F = 0.4; no bigram; mean over two examples with a perfect one
    r = score("rouge", ["cat", "a b c"], ["the cat is here", "A, b c!"])
    assert r["rouge1"] == pytest.approx((40 + 100) / 2)
    assert r["rouge2"] == pytest.approx((0 + 100) / 2)
    # LCS respects order: "b a" vs "a b" -> LCS 1 -> F 0.5
    assert score("rouge", ["b a"], ["a b"])["rougeL"] == pytest.approx(50)


def test_squad_em_f1_hand_checked():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    r = score(
        "em_f1", ["the Eiffel Tower", "Paris France", "nothing"], [["Eiffel Tower", "tower"], "Paris", ["x"]]
    )
    assert r["exact_match"] == pytest.approx(100 / 3)
    # F1: 1.0; P=1/2, R=1 -> 2/3; 0
    assert r["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_loss_metric_and_errors():
    assert score("loss", ["a"], ["b"]) == {}
    with pytest.raises(ValueError):
        score("bleu", ["a"], ["b"])
    with pytest.raises(ValueError):
        score("rouge", ["a"], [])
