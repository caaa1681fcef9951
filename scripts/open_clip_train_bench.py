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
import ctypes
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


def kernel_windows():
    """Marks windows in the GPU kernel timeline of scripts/cuda/kernel_profile.c when the CUDA
    driver loaded it (CUDA_INJECTION64_PATH), as coca-worker bench does; a no-op otherwise.
    Call after CUDA is initialised."""
    path = os.environ.get("CUDA_INJECTION64_PATH")
    marker = None
    if path:
        try:
            # RTLD_NOLOAD: only the copy the driver loaded, never a second one.
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            marker = library.coca_kernel_profile_window
            marker.argtypes = [ctypes.c_char_p]
        except (OSError, AttributeError):
            marker = None

    def window(label, timed):
        if marker is not None and timed:
            marker(label.encode() if label else None)

    return window


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


# open_clip 3.3.0's `generate` imports generation helpers that transformers 5 removed.
_has_generate = getattr(open_clip.coca_model, "_has_transformers", False)


def create_model(name):
    """open_clip's model `name` (a built-in name or a model-config JSON file), untrained."""
    if name.endswith(".json"):
        # open_clip names a config file's model after the file's stem.
        open_clip.add_model_config(name)
        name = os.path.splitext(os.path.basename(name))[0]
    return open_clip.create_model(name, pretrained=None)


def coca_losses(model, loss_fn, images, text):
    """open_clip's CoCa forward pass and its `CoCaLoss` terms (contrastive, caption)."""
    out = model(images, text)
    return loss_fn(
        out["image_features"],
        out["text_features"],
        out["logits"],
        out["labels"],
        out["logit_scale"],
    )


def greedy_caption(model, image, seq_len):
    """open_clip's `generate(generation_type="top_k", top_k=1)` loop without transformers: the
    image encoded once, the whole prefix decoded at every step (open_clip keeps no cache),
    end-of-text forbidden until the last token, which is end-of-text."""
    sot, eot = 49406, 49407
    image_latent, image_embs = model._encode_image(image)
    out = torch.full((image.shape[0], 1), sot, device=image.device, dtype=torch.long)
    while out.shape[1] < seq_len:
        logits = model(
            image, out, image_latent=image_latent, image_embs=image_embs, output_labels=False
        )["logits"][:, -1].float()
        if out.shape[1] + 1 == seq_len:
            sample = torch.full_like(out[:, :1], eot)
        else:
            logits[:, eot] = float("-inf")
            sample = logits.argmax(dim=-1, keepdim=True)
        out = torch.cat((out, sample), dim=-1)
    return out


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
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N], as coca-worker's --device")
    parser.add_argument(
        "--tf32", action="store_true", help="TF32 for float32 matmuls (coca-worker's --tf32 True)"
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "amp_bf16"],
        help="open_clip's --precision: float32, or torch.autocast(bfloat16) (coca's --bf16 True)",
    )
    parser.add_argument(
        "--captions", action="store_true", help="also time a greedy 20-token caption of one image"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)
    model = create_model(args.model).to(device)
    model.train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    context = model.text.context_length
    vocab = model.text.vocab_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=generator).to(device)
    text = caption_rows(args.batch, context, vocab, generator).to(device)
    autocast = torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "amp_bf16"
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    window = kernel_windows()
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    step_times = []
    phase_times = {"forward_and_loss_s": [], "backward_s": [], "optimizer_s": []}
    for step in range(args.steps + 1):
        timed = step > 0
        start = time.perf_counter()
        window("forward", timed)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            losses = coca_losses(model, loss_fn, images, text)
        sync()
        window(None, timed)
        forward_done = time.perf_counter()
        window("backward", timed)
        sum(losses).backward()
        sync()
        window(None, timed)
        backward_done = time.perf_counter()
        window("update", timed)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sync()
        window(None, timed)
        if step > 0:
            end = time.perf_counter()
            step_times.append(end - start)
            phase_times["forward_and_loss_s"].append(forward_done - start)
            phase_times["backward_s"].append(backward_done - forward_done)
            phase_times["optimizer_s"].append(end - backward_done)

    model.eval()
    embed_times = []
    with torch.no_grad(), autocast:
        for step in range(args.steps + 1):
            start = time.perf_counter()
            window("embed", step > 0)
            model.encode_image(images)
            sync()
            window(None, step > 0)
            if step > 0:
                embed_times.append(time.perf_counter() - start)
    caption_times = []
    # 20 new tokens where the context allows (open_clip's decoder also holds the start token).
    caption_len = min(21, context - 2)
    if args.captions:
        with torch.no_grad(), autocast:
            for step in range(args.steps + 1):
                start = time.perf_counter()
                # End-of-text forbidden until the last token (as coca-worker bench does).
                if _has_generate:
                    model.generate(
                        images[:1],
                        generation_type="top_k",
                        top_k=1,
                        seq_len=caption_len,
                        min_seq_len=caption_len - 1,
                    )
                else:
                    greedy_caption(model, images[:1], caption_len)
                sync()
                if step > 0:
                    caption_times.append(time.perf_counter() - start)

    step = statistics.median(step_times)
    extra = {}
    if device.type == "cuda":
        extra["device_name"] = torch.cuda.get_device_name(device)
        extra["device_memory_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    if caption_times:
        extra["greedy_caption_s"] = statistics.median(caption_times)
        if not _has_generate:
            extra["greedy_caption_impl"] = "this script's loop (open_clip's generate needs transformers < 5)"
    print(
        json.dumps(
            {
                **extra,
                "device": str(device),
                "precision": args.precision,
                "tf32": args.tf32,
                "reference": f"open_clip {open_clip.__version__} / torch {torch.__version__}",
                "model": args.model,
                "batch": args.batch,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "cpu_model": cpu_model(),
                "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
                "train_step_s": step,
                "train_samples_per_s": args.batch / step,
                "train_phases_s": {k: statistics.median(v) for k, v in phase_times.items()},
                "embed_images_per_s": args.batch / statistics.median(embed_times),
            }
        )
    )


if __name__ == "__main__":
    main()
