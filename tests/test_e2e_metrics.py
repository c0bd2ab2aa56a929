"""E2E metrics against the official e2e-metrics script (`measure_scores.py -p`): regression values A and D
of the research notes, on test.txt grouped by MR (616 MRs with 2+ references; each MR's first reference
is the output, the others its references), to the precision the notes state."""

import math
import shutil

import pytest

from lorakit import e2e_metrics
from lorakit.e2e_metrics import bleu, e2e_scores, format_scores, group_by_mr, nist
from lorakit.train.data import bundled_data_dir

# case: (BLEU, NIST -p, METEOR, ROUGE-L, CIDEr) from the official script
OFFICIAL = {"A": (0.611767, 8.929005, 0.456336, 0.639225, 1.894472),
            "D": (0.414078, 2.611669, 0.296368, 0.520000, 0.762719)}


def _case(name: str) -> tuple[list[str], list[list[str]]]:
    groups = [refs for _, refs in group_by_mr(bundled_data_dir("e2e") / "test.txt") if len(refs) > 1]
    hyps = [refs[0].strip() for refs in groups]
    if name == "D":
        hyps = [" ".join(h.split()[:max(1, int(0.6 * len(h.split())))]) for h in hyps]
    return hyps, [refs[1:] for refs in groups]


def test_grouping_keeps_first_seen_order():
    groups = group_by_mr(bundled_data_dir("e2e") / "test.txt")
    assert len(groups) == 630 and sum(len(r) for _, r in groups) == 4693
    assert sum(len(r) > 1 for _, r in groups) == 616
    assert groups[0][0] == "name : Blue Spice | Type : coffee shop | area : city centre"


@pytest.mark.parametrize("case", ["A", "D"])
def test_bleu_and_nist_match_the_official_script(case):
    hyps, refs = _case(case)
    assert len(hyps) == 616
    assert bleu(hyps, refs) == pytest.approx(OFFICIAL[case][0], abs=1e-6)
    assert nist(hyps, refs) == pytest.approx(OFFICIAL[case][1], abs=1e-6)


def test_bleu_pads_missing_references_with_none_not_empty():
    hyps, refs = _case("D")
    padded = [r + [""] * (max(map(len, refs)) - len(r)) for r in refs]
    assert bleu(hyps, padded) != pytest.approx(bleu(hyps, refs), abs=1e-3)  # '' would count as a reference


def test_meteor_rouge_cider_match_the_official_script():
    assert shutil.which("java"), "METEOR, ROUGE-L and CIDEr need java: apt-get install -y default-jre-headless"
    for case in ("A", "D"):  # one Meteor JVM serves both cases
        scores, _ = e2e_scores(*_case(case))
        got = tuple(scores[k] for k in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"))
        assert got == pytest.approx(OFFICIAL[case], abs=1e-6)


def test_without_java_the_metrics_say_so(monkeypatch):
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda name: None)
    scores, notes = e2e_scores(["the vaults is a pub ."], [["The Vaults is a pub .", "A pub : The Vaults ."]])
    assert scores["METEOR"] is scores["ROUGE_L"] is scores["CIDEr"] is None and scores["BLEU"] > 0
    assert any("java not found" in n for n in notes) and "METEOR not computed" in format_scores(scores)


def test_nist_of_one_token_outputs_is_the_unigram_term():
    # "pub" is 2 of the 4 reference words: info log2(4/2) = 1, matched once per MR over 2 output unigrams;
    # no output has 2 tokens, so the bigram candidate count is 0 (the official script divides by zero there)
    # and that term adds nothing. Brevity: 2 output words against 2 + 2 mean reference words.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert nist(["pub", "pub"], [["the pub"], ["a pub"]]) == pytest.approx(math.exp(-beta * math.log(0.5) ** 2))
