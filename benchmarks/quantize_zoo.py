"""Static int8 across the zoo: cosine to float, which layers run in int8, fp32 vs int8 latency.

    TVM_NUM_THREADS=2 python benchmarks/quantize_zoo.py [--models resnet18,hf:bert] [--all] [--target x86-avx2]
        [--resume results.jsonl] [--no-timing]

For each model (random weights, BatchNorm statistics measured on random images, built as
tests/test_quantize_zoo.py builds it): ours fp32 (``fold,fuse``) and ours int8
(``fold,quantize{mode=int8},fuse``, 8 random calibration samples), both for ``--target``.
The table gives, on two held-out samples (the worst of the two):

* ``cosine``: the compiled int8 model against eager float;
* ``fake-quant``: the int8 build's QDQ graph run eagerly against eager float, so a gap
  between the two columns is the backend's and the rest is the quantizer's;
* ``1-step noise``: eager float against eager float whose *input* carries uniform noise of
  one int8 step (the input's range / 255). It measures how much the model itself amplifies a
  perturbation of that size, independently of any quantizer: where it is below 0.99, no
  int8 graph that quantizes the input can reach 0.99 (random-weight ShuffleNetV2 and RegNet
  at 64x64 are such chaotic networks);

then how many layers run in int8 and in float, the reasons for the float ones, and both
latencies (median, batch 1, the two builds taking turns; ``--no-timing`` leaves them out).
``--all`` runs every torchvision classifier and the HF encoders, smallest first (by the
parameter count torchvision lists); ``--resume FILE`` appends each row to FILE as a JSON line
and skips the models FILE already has, so a long sweep can be stopped and continued.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402
from common import host_banner, interleaved_medians, set_threads, table  # noqa: E402

import graphopt  # noqa: E402
from graphopt.testing import cosine, leaves  # noqa: E402
from test_quantize_zoo import FAST, PIPELINE, _samples, _zoo_names, build, measure_batchnorm_statistics  # noqa: E402

HEADERS = ["model", "cosine", "fake-quant", "1-step noise", "int8 layers", "float layers", "float because",
           "fp32 ms", "int8 ms", "speedup"]


def _min_cosine_of(fn, model, held_out) -> float:
    worst = 1.0
    for sample in held_out:
        with torch.no_grad():
            expected, actual = leaves(model(*sample)), leaves(fn(*sample))
        for e, a in zip(expected, actual):
            if isinstance(e, torch.Tensor) and e.is_floating_point():
                worst = min(worst, cosine(torch.as_tensor(a), e))
    return worst


def one_step_noise_cosine(model, held_out, calib) -> float:
    """Worst cosine of float against float with one int8 step of uniform noise on the float inputs."""
    steps = []
    for i, x in enumerate(calib[0]):
        if x.is_floating_point():
            seen = torch.cat([c[i].flatten() for c in calib])
            steps.append(float(seen.max() - seen.min()) / 255)
        else:
            steps.append(None)
    gen = torch.Generator().manual_seed(4)

    def noisy(*xs):
        return model(*(x if s is None else x + (torch.rand(x.shape, generator=gen) - 0.5) * s
                       for x, s in zip(xs, steps)))

    return _min_cosine_of(noisy, model, held_out)


def bench(name: str, target: str, timing: bool) -> list:
    model, inputs = build(name)
    model = measure_batchnorm_statistics(model, inputs)
    calib = _samples(inputs, 8, seed=2)
    held_out = _samples(inputs, 2, seed=3)
    int8 = graphopt.compile(model, target, inputs, PIPELINE, calibration_data=calib)
    report = int8.manifest["quantize"]
    why = Counter(r["reason"].split(":")[0] for r in report["float_why"])
    row = [name, f"{_min_cosine_of(int8, model, held_out):.4f}",
           f"{_min_cosine_of(int8.graph.forward, model, held_out):.4f}",
           f"{one_step_noise_cosine(model, held_out, calib):.4f}", len(report["quantized"]), len(report["float"]),
           ", ".join(f"{reason} ({n})" for reason, n in why.most_common()) or "-"]
    if not timing:
        return row + ["", "", ""]
    fp32 = graphopt.compile(model, target, inputs, "fold,fuse")
    x = held_out[0]
    ms = interleaved_medians({"fp32": lambda: fp32(*x), "int8": lambda: int8(*x)})
    return row + [ms["fp32"], ms["int8"], f"{ms['fp32'] / ms['int8']:.2f}x"]


def smallest_first(names: list[str]) -> list[str]:
    """``names`` ordered by the parameter count torchvision's weight tables list (HF encoders first)."""
    from graphopt.models import import_torchvision

    tv = import_torchvision()

    def size(name: str) -> int:
        if name.startswith("hf:"):
            return 0
        try:
            return int(tv.models.get_model_weights(name).DEFAULT.meta["num_params"])
        except (KeyError, AttributeError, ValueError):
            return 1 << 40
    return sorted(names, key=size)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(FAST))
    p.add_argument("--all", action="store_true", help="every torchvision classifier and the HF encoders")
    p.add_argument("--target", default="x86")
    p.add_argument("--resume", help="JSON-lines file: rows are appended to it, models it has are skipped")
    p.add_argument("--no-timing", action="store_true", help="accuracy and layer counts only")
    args = p.parse_args()
    set_threads()
    names = smallest_first(_zoo_names()) if args.all else args.models.split(",")
    done: dict[str, list] = {}
    if args.resume and os.path.exists(args.resume):
        with open(args.resume) as f:
            done = {row[0]: row for row in map(json.loads, filter(str.strip, f))}
    print(host_banner(args.target))
    print(table(HEADERS, []), flush=True)
    for name in names:
        if name in done:
            row = done[name]
        else:
            try:
                row = bench(name, args.target, timing=not args.no_timing)
            except Exception as e:  # one model's failure is a row of the table, not the end of the run
                row = [name, f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}"] + [""] * 8
            if args.resume:
                with open(args.resume, "a") as f:
                    f.write(json.dumps(row) + "\n")
        print(table(HEADERS, [row]).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
