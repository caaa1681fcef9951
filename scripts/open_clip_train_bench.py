#!/usr/bin/env python3
"""Training-step and image-embedding speed of open_clip's CoCa on this machine: the reference
figures for `train_step_s` and `embed_images_per_s` of `coca-worker bench` (README, Speed).

Optional, outside the product. Needs `pip install torch==2.9.1 open_clip_torch==3.3.0`.
It mirrors the bench's settings: a randomly initialised model, random normalised images, token
rows shaped like captions (start, words, end, padding), open_clip's CoCa loss (caption weight 2,
contrastive weight 1), AdamW (lr 1e-5, weight decay 0.1, PyTorch's default foreach kernels),
global-norm clipping at 1.0; the median of the timed steps after one warm-up. Embedding:
`encode_image` of the same batch without gradients, median after one warm-up.

Run it right before or after `coca-worker bench` with the same model, batch and threads: the
README's figures are such pairs. Prints one JSON line with the bench's field names, plus
torch's CPU kernel family (`torch.backends.cpu.get_cpu_capability()`) and the CPU model.
"""

import argparse
import json
import os
import statistics
import time

import open_clip
import torch
from open_clip.loss import CoCaLoss


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def caption_rows(batch, context, vocab, generator):
    """Token rows like the bench's: sot, random words, eot, then zeros (open_clip's pad)."""
    text = torch.zeros(batch, context, dtype=torch.long)
    for b in range(batch):
        length = 2 + (b * 7 + 5) % (context - 1)
        text[b, 0] = min(49406, vocab - 2)
        if length > 2:
            text[b, 1 : length - 1] = torch.randint(1, vocab - 2, (length - 2,), generator=generator)
        text[b, length - 1] = min(49407, vocab - 1)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="coca_ViT-B-32",
        help="an open_clip model name, or a model-config JSON file (e.g. the fixture's config.json)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name = args.model
    if name.endswith(".json"):
        # open_clip names a config file's model after the file's stem.
        open_clip.add_model_config(name)
        name = os.path.splitext(os.path.basename(name))[0]
    model = open_clip.create_model(name, pretrained=None)
    model.train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    context = model.text.context_length
    vocab = model.text.vocab_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    text = caption_rows(args.batch, context, vocab, generator)
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    step_times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model(images, text)
        losses = loss_fn(
            out["image_features"],
            out["text_features"],
            out["logits"],
            out["labels"],
            out["logit_scale"],
        )
        sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step > 0:
            step_times.append(time.perf_counter() - start)

    model.eval()
    embed_times = []
    with torch.no_grad():
        for step in range(args.steps + 1):
            start = time.perf_counter()
            model.encode_image(images)
            if step > 0:
                embed_times.append(time.perf_counter() - start)

    step = statistics.median(step_times)
    print(
        json.dumps(
            {
                "reference": f"open_clip {open_clip.__version__} / torch {torch.__version__}",
                "model": args.model,
                "batch": args.batch,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "cpu_model": cpu_model(),
                "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
                "train_step_s": step,
                "train_samples_per_s": args.batch / step,
                "embed_images_per_s": args.batch / statistics.median(embed_times),
            }
        )
    )


if __name__ == "__main__":
    main()
