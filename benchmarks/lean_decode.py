"""How much a lean batch-1 Llama decode step would buy over transformers' forward (a lever measured before it is built).

The lean step calls the same modules (so LoRA wrappers and int8/int4 layers work unchanged) but skips
transformers' per-layer machinery: RMSNorm as 4 ops, rotary from a precomputed table, the KV written into a
preallocated buffer, one SDPA call with grouped-query heads, no masks (one row, no padding). Both run greedy from
the same prompt and KV; the script prints tokens/s for each and whether their tokens are equal.

    python benchmarks/lean_decode.py --weights int4        # SmolLM2, batch 1, 48 tokens, 2 threads
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def rms(x: torch.Tensor, norm) -> torch.Tensor:
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="int4", choices=["dense", "int8", "int4"])
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lorakit.models import resolve_model
    from lorakit.quant import quantize
    from lorakit.serve.kv import GrowingCache
    from lorakit.train.tasks import load_model, load_tokenizer

    path = resolve_model("smollm2")
    model = load_model(path, "causal_lm", []).eval()
    quantize(model, args.weights)
    tok = load_tokenizer(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    cfg, n = model.config, args.tokens
    length, total = ids.shape[1], ids.shape[1] + n + 1
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    layers = model.model.layers
    with torch.inference_mode():
        cos, sin = (t[0] for t in model.model.rotary_emb(torch.zeros(1), torch.arange(total)[None]))

    @torch.inference_mode()
    def hf() -> tuple[float, list[int]]:
        cache = GrowingCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt, toks = out.logits[:, -1].argmax(-1, keepdim=True), []
        start = time.perf_counter()
        for i in range(n):
            out = model(input_ids=nxt, attention_mask=torch.ones(1, length + i + 1, dtype=torch.long),
                        position_ids=torch.tensor([[length + i]]), past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt))
        return n / (time.perf_counter() - start), toks

    @torch.inference_mode()
    def lean() -> tuple[float, list[int]]:
        cache = GrowingCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        keys = [torch.zeros(1, nkv, total, hd) for _ in layers]
        values = [torch.zeros(1, nkv, total, hd) for _ in layers]
        for i, layer in enumerate(cache.layers):
            keys[i][:, :, :length], values[i][:, :, :length] = layer.keys, layer.values
        nxt, toks = int(out.logits[0, -1].argmax()), []
        emb, head, half = model.model.embed_tokens.weight, model.lm_head, hd // 2
        start = time.perf_counter()
        for step in range(n):
            pos = length + step
            h = emb[nxt].view(1, 1, -1)
            c, s = cos[pos], sin[pos]
            for i, layer in enumerate(layers):
                a, m = layer.self_attn, layer.mlp
                x = rms(h, layer.input_layernorm)
                q, k = a.q_proj(x).view(1, nh, hd), a.k_proj(x).view(1, nkv, hd)
                q = q * c + torch.cat((-q[..., half:], q[..., :half]), -1) * s
                k = k * c + torch.cat((-k[..., half:], k[..., :half]), -1) * s
                keys[i][0, :, pos], values[i][0, :, pos] = k[0], a.v_proj(x).view(nkv, hd)
                o = F.scaled_dot_product_attention(q.view(1, nh, 1, hd), keys[i][:, :, :pos + 1],
                                                   values[i][:, :, :pos + 1], enable_gqa=True)
                h = h + a.o_proj(o.view(1, 1, -1))
                x = rms(h, layer.post_attention_layernorm)
                h = h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
            nxt = int(head(rms(h, model.model.norm))[0, -1].argmax())
            toks.append(nxt)
        return n / (time.perf_counter() - start), toks

    hf(), lean()  # warm-up
    for _ in range(args.rounds):
        (a, ta), (b, tb) = hf(), lean()
        same = sum(x == y for x, y in zip(ta, tb, strict=True))
        print(f"weights {args.weights}: transformers {a:.1f} tok/s, lean step {b:.1f} tok/s ({b / a:.2f}x); "
              f"tokens equal at {same}/{n} positions", flush=True)


if __name__ == "__main__":
    main()
