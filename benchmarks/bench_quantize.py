"""int8 vs fp32: artifact size, x86 latency and accuracy, against ONNX Runtime and eager.

    TVM_NUM_THREADS=2 python benchmarks/bench_quantize.py [--models resnet18,digits_mlp] [--target x86-avx2]

For each model: ours fp32 (``fold,fuse``, the default pipeline), ours int8
(``fold,quantize{mode=int8},fuse``, or ``mode=dynamic`` for the transformer; both fused, so
the ratio is int8 vs fp32 and not fused vs unfused; int8 conv/linear run on VNNI, see
targets/cpu/schedules/int8.py), ONNX Runtime fp32, ORT int8 static QDQ and
dynamic (onnxruntime.quantization), PyTorch eager. Accuracy: test accuracy for the
digits models, cosine vs fp32 eager on held-out random inputs for the others. Every
ratio in the table comes from this one run (median latency, batch 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import numpy as np  # noqa: E402

from graphopt import timing  # noqa: E402
import torch  # noqa: E402

import graphopt  # noqa: E402
from graphopt.models import REFERENCE_MODELS, load_digits_split, train_digits  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import host_banner  # noqa: E402



def median_ms(fn, x, repeat):
    return timing.median_ms(lambda: fn(x), runs=repeat, warmup=1)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def setup(name):
    ref = REFERENCE_MODELS[name]
    model = ref.build()
    if name.startswith("digits"):
        model, _ = train_digits(model)
        xtr, _, xte, yte = load_digits_split(image=name == "digits_cnn")
        calib = [xtr[i:i + 1] for i in range(128)]
        return model, calib, (xte, yte)
    calib = [ref.example_input(1, seed=s) for s in range(1, 9)]
    held = [ref.example_input(1, seed=s) for s in range(100, 104)]
    return model, calib, held


def quality(run, model, evaluation):
    """Accuracy (digits: looped at batch 1, the compiled shape) or min cosine vs eager."""
    if isinstance(evaluation, tuple):
        xte, yte = evaluation
        preds = [int(np.argmax(np.asarray(run(xte[i:i + 1])))) for i in range(len(xte))]
        return f"acc {100 * float(np.mean(np.array(preds) == yte.numpy())):.2f}%"
    with torch.no_grad():
        return f"cos {min(cosine(run(x), model(x).detach().numpy()) for x in evaluation):.4f}"


def onnx_runs(model, x, calib, tmp):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = os.path.join(tmp, "m.onnx")
    torch.onnx.export(model, (x,), fp32, input_names=["x"], output_names=["y"], external_data=False, dynamo=False)
    pre = os.path.join(tmp, "m_pre.onnx")
    try:
        quant_pre_process(fp32, pre)
    except AssertionError:  # ORT's symbolic shape inference gives up on some reshapes (the transformer)
        quant_pre_process(fp32, pre, skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": c.numpy()} for c in calib])

        def get_next(self):
            return next(self.it, None)

    static, dynamic = os.path.join(tmp, "m_qdq.onnx"), os.path.join(tmp, "m_dyn.onnx")
    quantize_static(pre, static, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    quantize_dynamic(pre, dynamic, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ["TVM_NUM_THREADS"])
    opts.inter_op_num_threads = 1  # as in peers.py: the intra-op pool gets the cores
    runs = {}
    for label, path in (("ORT fp32", fp32), ("ORT int8 QDQ", static), ("ORT int8 dynamic", dynamic)):
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        runs[label] = (lambda s: lambda t: s.run(None, {"x": np.asarray(t, dtype=np.float32)})[0])(sess), \
            os.path.getsize(path)
    return runs


def bench(name, repeat, target="x86"):
    model, calib, evaluation = setup(name)
    x = calib[0]
    int8_pipe = "fold,quantize{mode=dynamic},fuse" if name == "transformer" else "fold,quantize{mode=int8},fuse"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ours = {}
        for label, pipe in (("ours fp32", "fold,fuse"), ("ours int8", int8_pipe)):
            cm = graphopt.compile(model, target, (x,), pipe, calibration_data=calib)
            cm.save(os.path.join(tmp, label.replace(" ", "_")))
            ours[label] = (lambda c: lambda t: c(np.asarray(t, dtype=np.float32)))(cm), \
                dir_size(os.path.join(tmp, label.replace(" ", "_")))
        runs = {**ours, **onnx_runs(model, x, calib, tmp)}
        with torch.no_grad():
            runs["eager"] = (lambda t: model(torch.as_tensor(t)).detach().numpy(), None)
        base = None
        for label, (run, size) in runs.items():
            ms = median_ms(run, x, repeat)
            base = base or ms
            rows.append((name, label, size, ms, base / ms, quality(run, model, evaluation)))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="digits_mlp,digits_cnn,resnet18,mobilenet_v2,transformer")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--target", default="x86", help="graphopt's target preset, e.g. x86-avx2")
    args = p.parse_args()
    print(host_banner(args.target))
    print("| model | runtime | artifact MB | ms (median, batch 1) | speedup vs ours fp32 | quality |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for model, label, size, ms, speed, q in bench(name, args.repeat, args.target):
            mb = f"{size / 1e6:.2f}" if size else "-"
            print(f"| {model} | {label} | {mb} | {ms:.3f} | {speed:.2f}x | {q} |", flush=True)


if __name__ == "__main__":
    main()
