"""Peak resident memory of one open_clip CoCa training step on the CPU: the reference for
`coca-worker bench-memory --batch N` (README, Memory), measured the same way: after warm-up
steps, freed memory is handed back to the kernel (`malloc_trim`) and the peak reset
(`/proc/self/clear_refs`), then one step (forward, loss, backward, clipping, AdamW) is measured.

Optional, outside the product; Linux only. Needs torch and open_clip_torch 3.3.0 (see
scripts/open_clip_train_bench.py). Prints one JSON line:

    python scripts/open_clip_step_memory.py --batch 8 --threads 2 [--precision amp_bf16]
        [--grad-checkpointing]

`between_steps_bytes` is the process's resident memory between steps (weights, AdamW's moments,
and torch's own libraries; the gradients are released by `zero_grad(set_to_none=True)`), and
`step_bytes` what one step adds at its peak (activations and the gradients). coca's
`persistent_bytes` keeps its flat gradient buffer between steps instead.
"""

import argparse
import ctypes
import gc
import json

import torch
from open_clip.loss import CoCaLoss

from open_clip_train_bench import caption_rows, coca_losses, create_model


def status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="coca_ViT-B-32", help="an open_clip model name or a model-config JSON file"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16"])
    parser.add_argument("--grad-checkpointing", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model)
    model.train()
    model.set_grad_checkpointing(args.grad_checkpointing)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    text = caption_rows(args.batch, model.text.context_length, model.text.vocab_size, generator)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "amp_bf16")
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            losses = coca_losses(model, loss_fn, images, text)
        sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(2):
        step()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    between = status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    step()
    peak = status_bytes("VmHWM:")
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "precision": args.precision,
                "grad_checkpointing": args.grad_checkpointing,
                "threads": torch.get_num_threads(),
                "between_steps_bytes": between,
                "peak_bytes": peak,
                "step_bytes": peak - between,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
    )


if __name__ == "__main__":
    main()
