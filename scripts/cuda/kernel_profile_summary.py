#!/usr/bin/env python3
"""Summarises a kernel timeline written by scripts/cuda/kernel_profile.c.

For each window label the program marked (coca-worker bench: forward_backward, update, forward,
embed; scripts/open_clip_train_bench.py: forward, backward, update, embed), per window on
average: the wall time, the time the GPU was busy (the union of its kernels, copies and
fills), the number of kernels, the time per kind of kernel (matrix products, attention, our
fused kernels, copies and casts, reductions, other elementwise, NCCL, memcpy, memset), and the
kernels that took the most time. A window's idle share is what the host's launching left
unused; matrix products near the busy time mean the rest is already small.

    python3 scripts/cuda/kernel_profile_summary.py run.tsv [--top 25] [--json-only] [--table F]

Prints a table, then one JSON line (the last line). No dependencies beyond Python 3.8; uses
c++filt to demangle names when it is on PATH.
"""
import argparse
import collections
import json
import re
import shutil
import subprocess
import sys

# Kinds of kernel, the first match wins (tested on the name as demangled, then as recorded).
KINDS = [
    ("nccl", re.compile(r"nccl", re.I)),
    ("attention", re.compile(r"flash|fmha|sdpa|attention|mha", re.I)),
    (
        "matmul",
        re.compile(r"gemm|xmma|cutlass|nvjet|cublas|sm\d+_.*mma|matmul|gemv|dot_kernel", re.I),
    ),
    (
        "fused_ops",
        re.compile(
            r"layer_norm|softmax|gelu|cross_entropy|add_bias|column_sum|column_partials|"
            r"embedding_|adam_moment|adamw_param|log_softmax|nll_loss",
            re.I,
        ),
    ),
    ("copy_cast", re.compile(r"copy|cast|transpose|permute|cat_|catarray|to_dtype|where_", re.I)),
    ("reduce", re.compile(r"reduce|sum|norm|max|min|argmax|mean", re.I)),
    ("elementwise", re.compile(r"elementwise|affine|unary|binary|b(add|sub|mul|div)|fill|pow", re.I)),
]


def demangle(names):
    """Demangled names where c++filt is available, else a short form of each."""
    names = list(names)
    if shutil.which("c++filt") and names:
        try:
            out = subprocess.run(
                ["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=60
            ).stdout.splitlines()
            if len(out) == len(names):
                return dict(zip(names, out))
        except (OSError, subprocess.SubprocessError):
            pass
    return {n: short_name(n) for n in names}


def short_name(name):
    """The qualified name of an Itanium-mangled symbol (`_ZN2at6native6kernelI...` →
    `at::native::kernel<…>`), or the name itself when it is not mangled."""
    if not name.startswith("_Z"):
        return name
    i = 2
    nested = name.startswith("_ZN")
    if nested:
        i = 3
    parts = []
    while i < len(name):
        if name.startswith("St", i):
            parts.append("std")
            i += 2
            continue
        m = re.match(r"\d+", name[i:])
        if not m:
            break
        n = int(m.group())
        i += len(m.group())
        parts.append(name[i : i + n])
        i += n
        if not nested:
            break
    if not parts:
        return name
    text = "::".join(parts)
    if i < len(name) and name[i] == "I":
        text += "<…>"
    return text


def kind_of(display, raw):
    for kind, pattern in KINDS:
        if pattern.search(display) or pattern.search(raw):
            return kind
    return "other"


def busy_ns(intervals):
    """The length of the union of [start, end) intervals."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def read(path):
    """(windows [(label, open, close)], activities [(what, start, end, name)], dropped)."""
    windows, activities, dropped = [], [], 0
    opened = None
    with open(path, errors="replace") as f:
        for number, text in enumerate(f, 1):
            fields = text.rstrip("\n").split("\t", 4)
            if len(fields) != 5:
                raise SystemExit(f"{path}:{number}: expected 5 tab-separated fields: {text!r}")
            what, start, end, _stream, name = fields
            start, end = int(start), int(end)
            if what == "open":
                opened = (name, start)
            elif what == "close":
                if opened is None:
                    raise SystemExit(f"{path}:{number}: a window closes that never opened")
                windows.append((opened[0], opened[1], start))
                opened = None
            elif what == "dropped":
                dropped += start
            else:
                activities.append((what, start, end, name))
    return windows, activities, dropped


def summarise(windows, activities, top):
    if not windows:
        starts = [a[1] for a in activities] or [0]
        ends = [a[2] for a in activities] or [0]
        windows = [("whole run", min(starts), max(ends))]
    activities.sort(key=lambda a: a[1])
    names = demangle({a[3] for a in activities if a[0] == "kernel"})
    labels = collections.OrderedDict()
    for label, opened, closed in windows:
        labels.setdefault(label, []).append((opened, closed))
    report = {}
    for label, spans in labels.items():
        count = len(spans)
        inside = [a for a in activities if any(o <= a[1] < c for o, c in spans)]
        wall = sum(c - o for o, c in spans)
        busy = busy_ns([(a[1], a[2]) for a in inside])
        per_kind = collections.Counter()
        per_kernel = collections.defaultdict(lambda: [0, 0])
        for what, start, end, name in inside:
            if what == "kernel":
                display = names.get(name, name)
                kind = kind_of(display, name)
                key = display[:160]
            else:
                kind, key = what, re.sub(r" \d+ bytes$", "", name)
            per_kind[kind] += end - start
            per_kernel[(kind, key)][0] += 1
            per_kernel[(kind, key)][1] += end - start
        kernels = sum(1 for a in inside if a[0] == "kernel")
        report[label] = {
            "windows": count,
            "wall_ms": wall / count / 1e6,
            "gpu_busy_ms": busy / count / 1e6,
            "gpu_idle_share": 1 - busy / wall if wall else 0.0,
            "kernels": kernels / count,
            "kernel_mean_us": sum(e - s for w, s, e, _ in inside if w == "kernel") / kernels / 1e3
            if kernels
            else 0.0,
            "by_kind_ms": {k: v / count / 1e6 for k, v in per_kind.most_common()},
            "top": [
                {
                    "name": key,
                    "kind": kind,
                    "calls": calls / count,
                    "ms": ns / count / 1e6,
                    "mean_us": ns / calls / 1e3,
                }
                for (kind, key), (calls, ns) in sorted(
                    per_kernel.items(), key=lambda item: -item[1][1]
                )[:top]
            ],
        }
    return report


def print_table(report, out):
    for label, r in report.items():
        print(
            f"== {label}: {r['windows']} window(s); per window {r['wall_ms']:.2f} ms wall, "
            f"GPU busy {r['gpu_busy_ms']:.2f} ms (idle {100 * r['gpu_idle_share']:.1f} %), "
            f"{r['kernels']:.0f} kernels of {r['kernel_mean_us']:.1f} us on average",
            file=out,
        )
        print("   by kind (ms per window): " + ", ".join(
            f"{k} {v:.2f}" for k, v in r["by_kind_ms"].items()), file=out)
        for t in r["top"]:
            print(
                f"   {t['ms']:9.3f} ms {t['calls']:7.1f} calls {t['mean_us']:9.1f} us  "
                f"[{t['kind']}] {t['name'][:110]}",
                file=out,
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tsv", help="the file COCA_KERNEL_PROFILE named")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per window label")
    parser.add_argument("--json-only", action="store_true", help="only the JSON line")
    parser.add_argument("--table", help="also write the table to this file")
    args = parser.parse_args()
    windows, activities, dropped = read(args.tsv)
    report = summarise(windows, activities, args.top)
    outputs = [] if args.json_only else [sys.stdout]
    if args.table:
        outputs.append(open(args.table, "w"))
    for out in outputs:
        print_table(report, out)
        if dropped:
            print(f"!! CUPTI dropped {dropped} records: the figures are short", file=out)
    print(json.dumps({"profile": args.tsv, "dropped_records": dropped, "windows": report}))


if __name__ == "__main__":
    main()
