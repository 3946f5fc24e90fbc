"""graphopt's CUDA artifacts on an NVIDIA GPU against eager PyTorch and torch.compile there.

    python benchmarks/bench_cuda.py [--models mlp,cnn,resnet18,mobilenet_v2,transformer]
                                    [--batch 1] [--target cuda] [--runs 50] [--out DIR]

For each model: compile for ``--target`` (``cuda`` = sm_80, or ``cuda:sm_XX``), save the artifact,
load it back, check its output against eager PyTorch (on the GPU when this PyTorch has CUDA,
else on the CPU) and time it, median ms of ``--runs`` synchronized calls:

* graphopt end to end: ``module(x)`` with a host tensor (copy in, kernels, copy out);
* graphopt on device: the VM's entry on inputs already on the GPU, then a device sync;
* eager and torch.compile on the GPU (inputs already there; needs a CUDA build of PyTorch).

Without a GPU the builds still run (that part is tested in tests/test_cuda_build.py), each
artifact's device code is listed, and the script exits with status 2: there is nothing to time.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import table  # noqa: E402

MODELS = ("mlp", "cnn", "resnet18", "mobilenet_v2", "transformer")


def _synced_median_ms(fn, sync, runs: int) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", default=None, help="where to keep the artifacts (default: a temporary folder)")
    args = ap.parse_args()

    import torch
    import tvm

    import graphopt
    from graphopt.models import REFERENCE_MODELS

    gpu = tvm.cuda(0).exist
    torch_cuda = torch.cuda.is_available()
    out_dir = args.out or tempfile.mkdtemp(prefix="graphopt-cuda-")
    rows = []
    for name in args.models.split(","):
        ref = REFERENCE_MODELS[name]
        model, x = ref.build().eval(), ref.example_input(args.batch)
        t0 = time.perf_counter()
        built = graphopt.compile(model, args.target, (x,))
        build_s = time.perf_counter() - t0
        path = built.save(os.path.join(out_dir, name))
        print(f"{name}: built in {build_s:.1f} s -> {path}; device code {built.manifest.get('device_code')}")
        if not gpu:
            continue
        module = graphopt.load(path)
        device = torch.device("cuda" if torch_cuda else "cpu")
        eager = model.to(device)
        xd = x.to(device)
        with torch.no_grad():
            expected = eager(xd).float().cpu()
        got = module(x)
        err = float((got - expected).abs().max())
        scale = float(expected.abs().max()) or 1.0

        dev_args = [tvm.runtime.tensor(x.numpy(), tvm.cuda(0))]
        entry = module._entry()  # the VM function; inputs already on the GPU
        sync = tvm.cuda(0).sync
        row = [name, args.batch, f"{err:.2e} ({err / scale:.1e} rel)", build_s,
               _synced_median_ms(functools.partial(module, x), sync, args.runs),
               _synced_median_ms(functools.partial(entry, *dev_args), sync, args.runs)]
        if torch_cuda:
            with torch.no_grad():
                row.append(_synced_median_ms(functools.partial(eager, xd), torch.cuda.synchronize, args.runs))
                compiled = torch.compile(eager)
                row.append(_synced_median_ms(functools.partial(compiled, xd), torch.cuda.synchronize, args.runs))
        else:
            row += ["n/a (PyTorch without CUDA)"] * 2
        rows.append(row)

    if not gpu:
        print(f"\nno CUDA GPU here (tvm.cuda(0).exist is False): artifacts built in {out_dir}, nothing timed")
        return 2
    print(f"\n{torch.cuda.get_device_name(0) if torch_cuda else 'GPU'}, target {args.target}, median ms of "
          f"{args.runs} synchronized calls\n")
    print(table(["model", "batch", "max abs error vs eager", "build s", "graphopt end to end",
                 "graphopt on device", "eager CUDA", "torch.compile CUDA"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
