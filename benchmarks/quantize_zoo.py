"""Static int8 across the zoo: cosine to float, which layers run in int8, fp32 vs int8 latency.

    TVM_NUM_THREADS=2 python benchmarks/quantize_zoo.py [--models resnet18,hf:bert] [--all] [--target x86-avx2]

For each model (random weights, BatchNorm statistics measured on random images, built as
tests/test_quantize_zoo.py builds it): ours fp32 (``fold,fuse``) and ours int8
(``fold,quantize{mode=int8},fuse``, 8 random calibration samples), both for ``--target``.
The table gives the cosine of int8 to eager float (worst of two held-out samples), how many
layers run in int8 and in float, the reasons for the float ones, and both latencies (median,
batch 1, the two builds taking turns). The host CPU and the target's ISA are printed above.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import host_banner, interleaved_medians, set_threads, table  # noqa: E402

import graphopt  # noqa: E402
from test_quantize_zoo import FAST, PIPELINE, _samples, _zoo_names, build, measure_batchnorm_statistics, \
    min_cosine  # noqa: E402


def bench(name: str, target: str) -> list:
    model, inputs = build(name)
    model = measure_batchnorm_statistics(model, inputs)
    calib = _samples(inputs, 8, seed=2)
    held_out = _samples(inputs, 2, seed=3)
    fp32 = graphopt.compile(model, target, inputs, "fold,fuse")
    int8 = graphopt.compile(model, target, inputs, PIPELINE, calibration_data=calib)
    report = int8.manifest["quantize"]
    why = Counter(r["reason"].split(":")[0] for r in report["float_why"])
    x = held_out[0]
    ms = interleaved_medians({"fp32": lambda: fp32(*x), "int8": lambda: int8(*x)})
    return [name, f"{min_cosine(model, int8, held_out):.4f}", len(report["quantized"]), len(report["float"]),
            ", ".join(f"{reason} ({n})" for reason, n in why.most_common()) or "-",
            ms["fp32"], ms["int8"], f"{ms['fp32'] / ms['int8']:.2f}x"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(FAST))
    p.add_argument("--all", action="store_true", help="every torchvision classifier and the HF encoders")
    p.add_argument("--target", default="x86")
    args = p.parse_args()
    set_threads()
    names = _zoo_names() if args.all else args.models.split(",")
    print(host_banner(args.target))
    headers = ["model", "cosine", "int8 layers", "float layers", "float because", "fp32 ms", "int8 ms", "speedup"]
    print(table(headers, []), flush=True)
    for name in names:
        try:
            row = bench(name, args.target)
        except Exception as e:  # one model's failure is a row of the table, not the end of the run
            row = [name, f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}", "", "", "", "", "", ""]
        print(table(headers, [row]).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
