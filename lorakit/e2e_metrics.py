"""E2E NLG metrics as the official `tuetschek/e2e-metrics` script computes them (`measure_scores.py -p`,
the path the LoRA paper ran): multi-reference, one output per MR.

    BLEU-4    sacrebleu corpus_bleu, mteval-v13a tokens, lowercased, refs padded with None (not '')
    NIST-5    written here (no PyPI package matches): the script's Python (`-p`) path, whose brevity
              penalty uses Σ_segments mean reference length (its Perl path differs on short outputs)
    METEOR    pycocoevalcap 1.2: PTBTokenizer, then Meteor 1.5 (java), one JVM reused
    ROUGE-L   pycocoevalcap Rouge on the same PTB tokens
    CIDEr     pycocoevalcap Cider on the same PTB tokens

The three pycocoevalcap metrics need `java`; without it they are reported as not computed (None) with
the reason, never as a number. COCOEvalCap.evaluate is not used: it also runs SPICE, which downloads
CoreNLP at run time.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from lorakit.train.readers import read_e2e

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
JAVA_MISSING = "java not found: METEOR, ROUGE-L and CIDEr need a Java runtime (apt-get install default-jre-headless)"
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # the penalty is exp(-β·ln²(len ratio)): 0.5 at ratio 1.5
_meteor = None  # one Meteor JVM per process (each start costs ~14 s and takes -Xmx2G)


def group_by_mr(path: str | Path) -> list[tuple[str, list[str]]]:
    """(MR, its references) for every MR of an `MR||reference` file, in first-seen order, stripped."""
    groups: dict[str, list[str]] = {}
    for ex in read_e2e(path):
        groups.setdefault(ex.prompt, []).append(ex.completion)
    return list(groups.items())


@lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def mteval_tokens(text: str) -> list[str]:
    """mteval-v13a tokenization, lowercased, as the script's Python path splits it (an empty text is one
    empty token there, which this keeps)."""
    return _tokenizer_13a()(text.strip()).lower().split(" ")


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] with sacrebleu (13a, lowercase; closest ref length, shorter on ties)."""
    from sacrebleu import corpus_bleu

    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    return corpus_bleu(hyps, streams, tokenize="13a", lowercase=True).score / 100


def nist(hyps: list[str], refs: list[list[str]], max_n: int = 5) -> float:
    """Corpus NIST-n of the e2e script's `-p` path.

        info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over all references of the corpus
                       (count of the empty prefix = total reference words)
        NIST = Σ_n Σ_seg Σ_hit-ngram info·min(hyp count, max count in one ref of the seg) / Σ_seg (len_hyp - n + 1)
               · exp(-β ln²(min(1, Σ len_hyp / Σ_seg mean ref len)))
    As the script does, the per-n candidate counts len - n + 1 are not clipped at 0. Where they sum to 0 (every
    output shorter than n tokens; the script divides by zero there) that n adds nothing.
    """
    ref_counts: list[Counter] = [Counter() for _ in range(max_n + 1)]
    hits: list[list[Counter]] = [[] for _ in range(max_n)]
    cand_lens: list[int] = [0] * max_n
    ref_len = 0.0
    for hyp, seg_refs in zip(hyps, refs, strict=True):
        h, rs = mteval_tokens(hyp), [mteval_tokens(r) for r in seg_refs]
        for n in range(1, max_n + 1):
            cand_lens[n - 1] += len(h) - n + 1
            best: dict[tuple, int] = defaultdict(int)  # per n-gram, the max count in any one reference
            for r in rs:
                grams = _ngrams(r, n)
                ref_counts[n].update(grams)
                for g, c in grams.items():
                    best[g] = max(best[g], c)
            hits[n - 1].append(Counter({g: min(c, best[g]) for g, c in _ngrams(h, n).items() if best.get(g)}))
        ref_counts[0][()] += sum(len(r) for r in rs)
        ref_len += sum(len(r) for r in rs) / len(rs)

    def info(g: tuple) -> float:
        return math.log2(ref_counts[len(g) - 1][g[:-1]] / ref_counts[len(g)][g])

    score = sum(sum(info(g) * c for seg in hits[n] for g, c in seg.items()) / cand_lens[n]
                for n in range(max_n) if cand_lens[n])
    ratio = cand_lens[0] / ref_len
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return score * penalty


def _get_meteor():
    global _meteor
    if _meteor is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor = Meteor()
    return _meteor


def coco_metrics(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """METEOR, ROUGE-L and CIDEr with pycocoevalcap, on PTB tokens (lowercased, punctuation removed)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    return {"METEOR": float(_get_meteor().compute_score(gts, res)[0]),
            "ROUGE_L": float(Rouge().compute_score(gts, res)[0]), "CIDEr": float(Cider().compute_score(gts, res)[0])}


def e2e_scores(hyps: list[str], refs: list[list[str]]) -> tuple[dict[str, float | None], list[str]]:
    """({metric: value or None}, notes): all five metrics; None with a note for any that could not run."""
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"{len(hyps)} outputs for {len(refs)} MRs: expected one output per MR, at least one")
    hyps = [" ".join(h.split()) for h in hyps]  # one line each (a newline would shift the PTB tokenizer's lines)
    scores: dict[str, float | None] = {"BLEU": bleu(hyps, refs), "NIST": nist(hyps, refs)}
    notes = ["NIST: the e2e-metrics script's Python (-p) path, as the LoRA paper reports it"]
    if shutil.which("java") is None:
        scores |= {"METEOR": None, "ROUGE_L": None, "CIDEr": None}
        notes.append(JAVA_MISSING)
    else:
        scores |= coco_metrics(hyps, refs)
    return scores, notes


def format_scores(scores: dict[str, float | None]) -> str:
    """One line: BLEU, METEOR, ROUGE-L ×100 and NIST, CIDEr as they come (the paper's Table 3 units)."""
    scale = {"BLEU": 100, "NIST": 1, "METEOR": 100, "ROUGE_L": 100, "CIDEr": 1}
    return "  ".join(f"{name} {'not computed' if scores[name] is None else f'{scores[name] * scale[name]:.2f}'}"
                     for name in METRICS)


__all__ = ["JAVA_MISSING", "METRICS", "bleu", "coco_metrics", "e2e_scores", "format_scores", "group_by_mr", "nist"]
