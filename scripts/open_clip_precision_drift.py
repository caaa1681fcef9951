#!/usr/bin/env python3
"""How far open_clip's own autocast moves the fixture trajectory from float32: the reference
for `tests/precision_drift.rs`.

Optional, outside the product. Needs `pip install torch==2.9.1 open_clip_torch==3.3.0
safetensors`. Trains `../shared/fixtures/coca-tiny` for the 6 AdamW steps of its `extras.json`
`train` settings (fixed batch, learning rate per step, betas, eps, weight decay with open_clip's
exemptions, clipping at 5, logit-scale clamp) in float32, then under `torch.autocast("cpu",
bfloat16)` and float16 (no loss scaling: nothing overflows in 6 steps), and prints one JSON line
per precision: the largest relative loss difference over the steps and the worst tensor's
`rms(a − b) / max(rms(a), lr·steps)` (the test's measure; the key third of a packed
`in_proj_bias` is left out: its gradient is zero, so Adam moves it by rounding noise).

    python scripts/open_clip_precision_drift.py [../shared/fixtures/coca-tiny]
"""

import json
import math
import sys

import torch
from open_clip.coca_model import CoCa
from open_clip.loss import CoCaLoss
from safetensors.torch import load_file

NO_DECAY = ("bn", "ln", "bias", "logit_scale")


def trajectory(fixture, dtype):
    cfg = json.load(open(f"{fixture}/config.json"))
    settings = json.load(open(f"{fixture}/extras.json"))["train"]
    extras = load_file(f"{fixture}/extras.safetensors")
    model = CoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"])
    model.load_state_dict(load_file(f"{fixture}/weights.safetensors"))
    model.train()
    exempt = lambda n, p: p.ndim < 2 or any(k in n for k in NO_DECAY)  # noqa: E731
    params = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in params if not exempt(n, p)], "weight_decay": settings["weight_decay"]},
            {"params": [p for n, p in params if exempt(n, p)], "weight_decay": 0.0},
        ],
        lr=settings["lr"],
        betas=tuple(settings["betas"]),
        eps=settings["eps"],
    )
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    losses = []
    for lr in settings["lr_per_step"][: settings["steps"]]:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(extras["train.image"], extras["train.text"])
            loss = sum(loss_fn(out["image_features"], out["text_features"], out["logits"],
                               out["labels"], out["logit_scale"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    move = settings["lr"] * settings["steps"]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, move


def without_keys(t):
    third = t.shape[0] // 3
    return torch.cat([t[:third], t[2 * third:]])


def main():
    fixture = sys.argv[1] if len(sys.argv) > 1 else "../shared/fixtures/coca-tiny"
    torch.set_num_threads(2)
    losses32, params32, move = trajectory(fixture, torch.float32)
    for name, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        losses, params, _ = trajectory(fixture, dtype)
        worst, worst_name = 0.0, ""
        for n, a in params32.items():
            b = params[n]
            if n.endswith("attn.in_proj_bias"):
                a, b = without_keys(a), without_keys(b)
            rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
            ratio = rms(a - b) / max(rms(a), move)
            if ratio > worst:
                worst, worst_name = ratio, n
        loss_drift = max(abs(x - y) / abs(x) for x, y in zip(losses32, losses))
        print(json.dumps({"precision": name, "loss_drift": loss_drift,
                          "worst_parameter_drift": worst, "worst_parameter": worst_name}))


if __name__ == "__main__":
    main()
