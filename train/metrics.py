"""Task metrics on decoded strings: ROUGE-1/2/L F-measure and SQuAD exact match / F1, all 0-100.

ROUGE follows Google's rouge_score package without stemming: lower-case, every run of characters
other than a-z0-9 is a separator, per-example F-measure, mean over examples. ROUGE-L is the
sentence-level LCS F-measure. EM/F1 follow the official SQuAD v1.1 script: lower-case, strip
punctuation and the articles a/an/the, squash whitespace; token-overlap F1; the maximum over the
gold answers of each example.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

Reference = str | Sequence[str]


def score(metric: str, predictions: list[str], references: list[Reference]) -> dict[str, float]:
    """metric "rouge" -> rouge1/rouge2/rougeL; "em_f1" -> exact_match/f1; "loss" -> {} (loss only).
    A reference may be a list of acceptable answers (the best-matching one counts)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if metric == "rouge":
        return rouge(predictions, references)
    if metric == "em_f1":
        return em_f1(predictions, references)
    if metric == "loss":
        return {}
    raise ValueError(f"metric={metric!r}; expected rouge, em_f1 or loss")


def _refs(r: Reference) -> list[str]:
    return [r] if isinstance(r, str) else list(r) or [""]


# -- ROUGE ------------------------------------------------------------------------------------
def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(pred: list[str], ref: list[str], n: int) -> float:
    p, r = _ngrams(pred, n), _ngrams(ref, n)
    return _f(sum((p & r).values()), sum(p.values()), sum(r.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: list[str], ref: list[str]) -> float:
    return _f(lcs_length(pred, ref), len(pred), len(ref))


def rouge(predictions: list[str], references: list[Reference]) -> dict[str, float]:
    out = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    if not predictions:
        return out
    for pred, refs in zip(predictions, references):
        p = rouge_tokens(pred)
        best = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for ref in _refs(refs):
            r = rouge_tokens(ref)
            best["rouge1"] = max(best["rouge1"], rouge_n(p, r, 1))
            best["rouge2"] = max(best["rouge2"], rouge_n(p, r, 2))
            best["rougeL"] = max(best["rougeL"], rouge_l(p, r))
        for k in out:
            out[k] += best[k]
    return {k: 100.0 * v / len(predictions) for k, v in out.items()}


# -- SQuAD exact match and F1 -----------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:  # both empty counts as a match (SQuAD v2 convention)
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    return _f(common, len(p), len(r))


def em_f1(predictions: list[str], references: list[Reference]) -> dict[str, float]:
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = sum(max(exact_match(p, r) for r in _refs(rs)) for p, rs in zip(predictions, references))
    f = sum(max(f1(p, r) for r in _refs(rs)) for p, rs in zip(predictions, references))
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f / n}
