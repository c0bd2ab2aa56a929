"""Metrics against hand-computed cases, closed forms, and a line-by-line port of conlleval's chunk logic."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.train.metrics import accuracy, bio_spans, entity_f1, matthews_corr, word_tags

# ------------------------------------------------------------------------------ accuracy / MCC


def test_accuracy_counts_matches():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["a"], ["a"]) == 1.0


def test_accuracy_and_mcc_reject_bad_input():
    with pytest.raises(ValueError, match="3 predictions for 2 gold"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        matthews_corr([], [])


def _binary_mcc(tp, tn, fp, fn):
    """The textbook two-class formula, written independently of the multiclass one."""
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=40))
def test_mcc_binary_equals_textbook_formula(pairs):
    preds, golds = [p for p, _ in pairs], [g for _, g in pairs]
    tp = sum(p == 1 and g == 1 for p, g in pairs)
    tn = sum(p == 0 and g == 0 for p, g in pairs)
    fp = sum(p == 1 and g == 0 for p, g in pairs)
    fn = sum(p == 0 and g == 1 for p, g in pairs)
    assert matthews_corr(preds, golds) == pytest.approx(_binary_mcc(tp, tn, fp, fn), abs=1e-12)


def test_mcc_hand_cases():
    assert matthews_corr([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corr([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert matthews_corr([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions: undefined -> 0
    # 3 classes, golds a a b b c c, preds a b b b c a: s=6, c=4, p=(a2,b3,c1), t=(2,2,2)
    # (4*6 - (4+6+2)) / sqrt((36-14)(36-12)) = 12 / sqrt(528)
    got = matthews_corr(list("abbbca"), list("aabbcc"))
    assert got == pytest.approx(12 / math.sqrt(528))


# ------------------------------------------------------------------------------------ entity F1


def test_bio_spans_conlleval_rules():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {(0, 2, "PER"), (3, 4, "LOC")}
    assert bio_spans(["O", "I-PER", "I-PER"]) == {(1, 3, "PER")}  # I- after O starts an entity
    assert bio_spans(["B-PER", "I-LOC"]) == {(0, 1, "PER"), (1, 2, "LOC")}  # type change splits
    assert bio_spans(["B-PER", "B-PER"]) == {(0, 1, "PER"), (1, 2, "PER")}  # B- always starts
    assert bio_spans(["I-PER", "B-PER", "I-PER"]) == {(0, 1, "PER"), (1, 3, "PER")}
    assert bio_spans(["B-creative-work", "I-creative-work"]) == {(0, 2, "creative-work")}
    assert bio_spans([]) == set()
    with pytest.raises(ValueError, match="'U-PER' at position 1"):
        bio_spans(["O", "U-PER"])


def test_entity_f1_hand_cases():
    perfect = [["B-PER", "I-PER", "O"], ["B-LOC"]]
    assert entity_f1(perfect, perfect) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # gold PER(0,2) LOC(3,4); pred PER(0,1) LOC(3,4) -> 1 correct of 2 predicted, 2 gold
    got = entity_f1([["B-PER", "O", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]])
    assert got == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    # IOB1-style I- start equals the B- start: the same entity
    assert entity_f1([["O", "I-PER", "I-PER"]], [["O", "B-PER", "I-PER"]])["f1"] == 1.0
    # right span, wrong type: nothing correct
    assert entity_f1([["B-LOC", "I-LOC"]], [["B-PER", "I-PER"]])["f1"] == 0.0
    # 3 predicted, 1 gold, 1 correct: P=1/3, R=1, F=2*(1/3)/(4/3)=1/2
    got = entity_f1([["B-PER", "B-LOC", "O", "B-ORG"]], [["B-PER", "O", "O", "O"]])
    assert got["precision"] == pytest.approx(1 / 3) and got["recall"] == 1.0 and got["f1"] == pytest.approx(0.5)
    # sentences never merge: I-PER opening sentence 2 is its own entity
    assert entity_f1([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])["f1"] == 1.0


def test_entity_f1_empty_sides_are_zero_not_nan():
    assert entity_f1([["O", "O"]], [["B-PER", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert entity_f1([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entity_f1_rejects_misaligned_input():
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags for 2 gold"):
        entity_f1([["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="2 predicted sentences for 1 gold"):
        entity_f1([["O"], ["O"]], [["O"]])


def _split(tag):
    return tuple(tag.split("-", 1)) if tag != "O" else ("O", "")


def _end_of_chunk(prev_tag, tag, prev_type, typ):  # conlleval.pl endOfChunk, BIO branches
    return ((prev_tag, tag) in {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O")}
            or (prev_tag != "O" and prev_type != typ))


def _start_of_chunk(prev_tag, tag, prev_type, typ):  # conlleval.pl startOfChunk, BIO branches
    return ((prev_tag, tag) in {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I")}
            or (tag != "O" and prev_type != typ))


def _conlleval_counts(pred_sents, gold_sents):
    """conlleval.pl's main loop; a sentence boundary is read as an 'O' line, as the script does."""
    correct = found_guessed = found_correct = 0
    in_correct = False
    last_c, last_ct, last_g, last_gt = "O", "", "O", ""
    lines = []
    for pred, gold in zip(pred_sents, gold_sents, strict=True):
        lines += list(zip(gold, pred, strict=True)) + [("O", "O")]
    for gold, pred in lines:
        (c, ct), (g, gt) = _split(gold), _split(pred)
        if in_correct:
            end_c, end_g = _end_of_chunk(last_c, c, last_ct, ct), _end_of_chunk(last_g, g, last_gt, gt)
            if end_c and end_g and last_gt == last_ct:
                in_correct, correct = False, correct + 1
            elif end_c != end_g or gt != ct:
                in_correct = False
        start_c, start_g = _start_of_chunk(last_c, c, last_ct, ct), _start_of_chunk(last_g, g, last_gt, gt)
        if start_c and start_g and gt == ct:
            in_correct = True
        found_correct += start_c
        found_guessed += start_g
        last_c, last_ct, last_g, last_gt = c, ct, g, gt
    return correct, found_guessed, found_correct


_TAG = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 7).flatmap(lambda n: st.tuples(st.lists(_TAG, min_size=n, max_size=n),
                                                                  st.lists(_TAG, min_size=n, max_size=n))),
                min_size=1, max_size=5))
def test_entity_f1_equals_conlleval_port(sents):
    preds, golds = [p for p, _ in sents], [g for _, g in sents]
    correct, n_pred, n_gold = _conlleval_counts(preds, golds)
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    got = entity_f1(preds, golds)
    assert got == pytest.approx({"precision": p, "recall": r, "f1": f})


def test_word_tags_keeps_first_subwords_only():
    labels = ["O", "B-PER", "I-PER"]
    label_ids = [[-100, 1, -100, 2, 0, -100], [-100, 0, -100, -100, -100, -100]]
    pred_ids = [[0, 1, 2, 0, 0, 2], [1, 1, 0, 0, 0, 0]]
    preds, golds = word_tags(pred_ids, label_ids, labels)
    assert golds == [["B-PER", "I-PER", "O"], ["O"]]
    assert preds == [["B-PER", "O", "O"], ["B-PER"]]
