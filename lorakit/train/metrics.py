"""Evaluation metrics: accuracy, Matthews correlation, and entity-level F1 with conlleval's BIO decoding."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def accuracy(preds: Sequence, golds: Sequence) -> float:
    """Fraction of positions where pred == gold."""
    _check_lengths(preds, golds)
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def matthews_corr(preds: Sequence, golds: Sequence) -> float:
    """Matthews correlation (Gorodkin's multiclass R_K; the usual MCC for two classes), in [-1, 1].

        MCC = (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²))
    with s samples, c correct, p_k / t_k the predicted / true count of class k. 0 when undefined
    (all predictions or all golds one class), as sklearn does.
    """
    _check_lengths(preds, golds)
    s = len(golds)
    c = sum(p == g for p, g in zip(preds, golds, strict=True))
    p_k, t_k = Counter(preds), Counter(golds)
    classes = set(p_k) | set(t_k)
    cov_pt = c * s - sum(p_k[k] * t_k[k] for k in classes)
    cov_pp = s * s - sum(v * v for v in p_k.values())
    cov_tt = s * s - sum(v * v for v in t_k.values())
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / math.sqrt(cov_pp * cov_tt)


def _check_lengths(preds: Sequence, golds: Sequence) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"got {len(preds)} predictions for {len(golds)} gold labels; pass one per example.")
    if not golds:
        raise ValueError("no examples to score; the metric of an empty set is undefined.")


def bio_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """Entities of one sentence as (start, end_exclusive, type), decoded as conlleval does.

    An entity starts at B-x, or at I-x that follows O, the sentence start or a tag of another type
    (so `O I-per I-per` is one person); it runs over the following I-x of the same type.
    """
    spans = set()
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):  # the sentinel "O" closes an entity at the sentence end
        if tag != "O" and (len(tag) < 3 or tag[1] != "-" or tag[0] not in "BI"):
            raise ValueError(f"tag {tag!r} at position {i} is not a BIO tag; expected 'O', 'B-<type>' or "
                             "'I-<type>'.")
        prefix, tag_type = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        continues = prefix == "I" and tag_type == kind
        if kind is not None and not continues:
            spans.add((start, i, kind))
            kind = None
        if prefix != "O" and not continues:
            start, kind = i, tag_type
    return spans


def entity_f1(pred_tags: list[list[str]], gold_tags: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (fractions, not %), conlleval semantics.

    An entity counts as correct only if a predicted entity has exactly the gold start, end and type.
    precision = correct / predicted, recall = correct / gold, f1 = 2PR / (P + R); 0 when a denominator is 0.
    """
    if len(pred_tags) != len(gold_tags):
        raise ValueError(f"got {len(pred_tags)} predicted sentences for {len(gold_tags)} gold sentences.")
    n_pred = n_gold = n_correct = 0
    for i, (pred, gold) in enumerate(zip(pred_tags, gold_tags, strict=True)):
        if len(pred) != len(gold):
            raise ValueError(f"sentence {i}: {len(pred)} predicted tags for {len(gold)} gold tags; "
                             "predict one tag per word.")
        p, g = bio_spans(pred), bio_spans(gold)
        n_pred, n_gold, n_correct = n_pred + len(p), n_gold + len(g), n_correct + len(p & g)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def word_tags(pred_ids: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]],
              labels: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Turn per-subword predicted ids and encoded labels into word-level (pred_tags, gold_tags).

    Keeps the positions whose label is not -100 (the first subword of each word, as `encode` sets them),
    so words cut by truncation are left out of both sides alike. Feed the result to `entity_f1`.
    """
    preds, golds = [], []
    for pred_row, label_row in zip(pred_ids, label_ids, strict=True):
        keep = [(int(p), int(g)) for p, g in zip(pred_row, label_row, strict=True) if int(g) != -100]
        preds.append([labels[p] for p, _ in keep])
        golds.append([labels[g] for _, g in keep])
    return preds, golds
