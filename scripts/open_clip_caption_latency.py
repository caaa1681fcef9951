#!/usr/bin/env python3
"""Caption latency of open_clip's CoCa on this machine: the reference figures for the
`greedy_caption_s` and `beam_caption_s` of `coca-worker bench` (README, Speed).

Optional, outside the product. Needs
`pip install torch==2.9.1 open_clip_torch==3.3.0 transformers==4.55.4` (open_clip's `generate`
imports `BeamSearchScorer`, which transformers 4.57 and 5.x no longer export).
It mirrors the bench's settings: a randomly initialised model (the weights do not change the
work), one random 224×224 image, exactly 20 new tokens (`seq_len=21`, end-of-text forbidden
before the last position), median of the timed runs after one warm-up; greedy decoding
(open_clip's `top_k` with `top_k=1`), then beam search with open_clip's defaults (6 beams in 3
groups), as `caption` runs it.

open_clip recomputes the whole prefix at every step, so its time is bound by arithmetic and
hardly moves with the host's memory bandwidth; the bench's key/value-cache steps are bound by
the bandwidth. Run the two one after the other (the README's figures are such pairs).

Prints one JSON line.
"""

import argparse
import json
import statistics
import time

import open_clip
import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="coca_ViT-B-32")
    parser.add_argument("--runs", type=int, default=7, help="timed greedy captions after the warm-up")
    parser.add_argument("--beam_runs", type=int, default=3, help="timed beam-search captions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    image = torch.randn(1, 3, size, size)

    def caption(generation_type="top_k"):
        with torch.no_grad():
            return model.generate(
                image, generation_type=generation_type, top_k=1, seq_len=21, min_seq_len=20
            )

    tokens = caption().shape[1] - 1
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        caption()
        times.append(time.perf_counter() - start)
    beam_times = []
    for run in range(args.beam_runs + 1):
        start = time.perf_counter()
        caption("beam_search")
        if run > 0:
            beam_times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "model": args.model,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "open_clip": open_clip.__version__,
                "caption_new_tokens": tokens,
                "greedy_caption_s": statistics.median(times),
                "greedy_caption_all_s": times,
                "beam_caption_s": statistics.median(beam_times) if beam_times else None,
            }
        )
    )


if __name__ == "__main__":
    main()
