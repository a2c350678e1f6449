"""PyTorch eager reference for `tessera bench train`.

Builds the same Llama-style model as Tessera (same weights, read from the
safetensors file Tessera wrote), trains it on the same batch with the same
AdamW arithmetic, warm-up and gradient clipping, on the same number of threads,
and prints one JSON line: tokens per second and the first step's loss.

Usage: python reference_train.py ARGS.json
"""

import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def rope_tables(cfg, device):
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    exponents = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
    inv_freq = 1.0 / (torch.tensor(cfg["rope_theta"], dtype=torch.float32) ** exponents)
    positions = torch.arange(cfg["max_position_embeddings"], dtype=torch.int64).float()
    freqs = positions.unsqueeze(1) @ inv_freq.unsqueeze(0)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x, cos, sin):
    half = x.shape[3] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=3) * sin


def forward(p, cfg, ids, cos, sin):
    b, t = ids.shape
    d = cfg["hidden_size"]
    h, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h
    eps = cfg["rms_norm_eps"]
    cos, sin = cos[:t], sin[:t]
    x = F.embedding(ids, p["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        hn = F.rms_norm(x, [d], p[pre + "input_layernorm.weight"], eps)
        q = F.linear(hn, p[pre + "self_attn.q_proj.weight"]).view(b, t, h, hd).transpose(1, 2)
        k = F.linear(hn, p[pre + "self_attn.k_proj.weight"]).view(b, t, kvh, hd).transpose(1, 2)
        v = F.linear(hn, p[pre + "self_attn.v_proj.weight"]).view(b, t, kvh, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kvh != h:
            k = k.repeat_interleave(h // kvh, dim=1)
            v = v.repeat_interleave(h // kvh, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.linear(a.transpose(1, 2).reshape(b, t, d), p[pre + "self_attn.o_proj.weight"])
        hn = F.rms_norm(x, [d], p[pre + "post_attention_layernorm.weight"], eps)
        gated = F.silu(F.linear(hn, p[pre + "mlp.gate_proj.weight"])) * F.linear(hn, p[pre + "mlp.up_proj.weight"])
        x = x + F.linear(gated, p[pre + "mlp.down_proj.weight"])
    x = F.rms_norm(x, [d], p["model.norm.weight"], eps)
    head = p.get("lm_head.weight", p["model.embed_tokens.weight"])
    return F.linear(x, head)


def main():
    with open(sys.argv[1]) as f:
        args = json.load(f)
    torch.set_num_threads(args["threads"])
    cfg = args["config"]
    device = args.get("device", "cpu")
    params = {k: v.to(device).clone().requires_grad_(True) for k, v in load_file(args["weights"]).items()}
    with open(args["batch"], "rb") as f:
        raw = f.read()
    batch = torch.frombuffer(bytearray(raw), dtype=torch.int64).view(args["batch_size"], args["seq_len"] + 1).to(device)
    cos, sin = rope_tables(cfg, device)
    decay = [v for v in params.values() if v.dim() >= 2]
    no_decay = [v for v in params.values() if v.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args["lr"],
        betas=(args["beta1"], args["beta2"]),
        eps=args["eps"],
    )
    inputs, targets = batch[:, :-1], batch[:, 1:]
    losses = []

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = forward(params, cfg, inputs, cos, sin)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), args["grad_clip"])
        opt.step()
        losses.append(loss.item())

    for _ in range(args["warmup_steps"]):
        step()
    best = math.inf
    for _ in range(args["rounds"]):
        start = time.perf_counter()
        for _ in range(args["steps"]):
            step()
        best = min(best, time.perf_counter() - start)
    tokens = args["steps"] * args["batch_size"] * args["seq_len"]
    print(json.dumps({"tokens_per_second": tokens / best, "first_loss": losses[0], "torch": torch.__version__}))


if __name__ == "__main__":
    main()
