"""Train the reference CNN on scikit-learn's digits, then let graphopt explore pipelines on x86.

    python examples/digits_explore.py [--max-drop 0.01] [--report explore_report]

Real data, no download: scikit-learn ships the 1,797 8x8 handwritten digits. The test
split is halved: one half guides the search (``evaluate``), the other is held out to
check the chosen pipeline afterwards.
"""

from __future__ import annotations

import argparse

from graphopt.exploration import explore
from graphopt.exploration.search import build_candidate, candidate_of, make_metric
from graphopt.models import digits_cnn, load_digits_split, train_digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--report", default="explore_report")
    ap.add_argument("--cache", default=".graphopt-explore")
    ap.add_argument("--target", default="x86")
    args = ap.parse_args()

    model, test_acc = train_digits(digits_cnn(), epochs=30)
    xtr, ytr, xte, yte = load_digits_split(image=True)
    half = len(xte) // 2
    x_val, y_val, x_hold, y_hold = xte[:half], yte[:half], xte[half:], yte[half:]
    train = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(xtr), 64)]
    calib = [xtr[i:i + 1] for i in range(0, 64)]
    print(f"digits CNN trained: test accuracy {test_acc:.4f}")

    result = explore(model, (x_val[:1],), args.target, evaluate=(x_val, y_val), max_accuracy_drop=args.max_drop,
                     train_data=train, calibration_data=calib, cache_dir=args.cache, report_dir=args.report)
    print(result)
    if result.chosen is None:
        return
    chosen = result.chosen
    base = next(c for c in result.candidates if c.ok)
    # Rebuild the chosen candidate and check it on data the search never saw.
    module = build_candidate(model, (x_val[:1],), args.target, candidate_of(chosen), train, calib)[1]
    metric = make_metric((x_hold, y_hold))
    held_out = metric(module)
    eager_hold = metric(lambda x: model(x))
    print(f"\nchosen: `{chosen.pipeline}`{' (+finetune)' if chosen.finetuned else ''}: "
          f"{base.latency_ms / chosen.latency_ms:.2f}x faster than `{base.pipeline}`, "
          f"{chosen.size_bytes / base.size_bytes:.2f}x its size; held-out accuracy {held_out:.4f} "
          f"vs eager fp32 {eager_hold:.4f} (drop {eager_hold - held_out:+.4f})")
    print(f"report: {result.report}")


if __name__ == "__main__":
    main()
