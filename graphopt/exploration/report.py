"""The explore report: a Markdown file with PNG plots (matplotlib).

    report.md             the candidate table, the chosen pipeline, per-pass timing, sensitivity
    accuracy_latency.png  accuracy vs latency, Pareto front highlighted, chosen candidate marked
    size.png              artifact size per candidate
    sensitivity.png       per-layer quantization sensitivity (when the int8 candidate measured it)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the result type only; search.py calls write_report
    from graphopt.exploration.search import ExploreResult


def write_report(result: ExploreResult, folder: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    ok = [c for c in result.candidates if c.ok]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in ok:
        color = "tab:red" if c is result.chosen else ("tab:blue" if c.pareto else "tab:gray")
        ax.scatter(c.latency_ms, c.accuracy, s=60, color=color, zorder=3)
        ax.annotate(c.name, (c.latency_ms, c.accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((c for c in ok if c.pareto), key=lambda c: c.latency_ms)
    if front:
        ax.plot([c.latency_ms for c in front], [c.accuracy for c in front], "--", color="tab:blue",
                label="Pareto front", zorder=2)
    ax.axhline(result.baseline_accuracy - result.max_accuracy_drop, color="tab:orange", lw=1,
               label=f"budget (baseline {result.baseline_accuracy:.4f} - {result.max_accuracy_drop:g})")
    ax.set_xlabel(f"latency on {result.target} (ms, batch 1)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs latency")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "accuracy_latency.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * max(len(ok), 1)))
    ax.barh([c.name for c in ok], [c.size_bytes / 1024 for c in ok],
            color=["tab:red" if c is result.chosen else "tab:blue" for c in ok])
    ax.set_xlabel("artifact size (KiB)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "size.png"), dpi=110)
    plt.close(fig)

    sens = next((c.sensitivity for c in ok if c.sensitivity), [])
    if sens:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.35 * len(sens)))
        ax.barh([str(s.get("layer", "?")) for s in sens], [float(s.get("error", 0.0)) for s in sens],
                color="tab:purple")
        ax.set_xlabel("error when only this layer is quantized")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "sensitivity.png"), dpi=110)
        plt.close(fig)

    lines = [f"# graphopt explore report — target {result.target}", "",
             f"Baseline (eager fp32) accuracy: **{result.baseline_accuracy:.4f}**; "
             f"allowed drop: **{result.max_accuracy_drop:g}**.", ""]
    if result.chosen:
        lines += [f"Chosen pipeline: `{result.chosen.pipeline}`"
                  + (" (fine-tuned with distillation after pruning)" if result.chosen.finetuned else "")
                  + f" — accuracy {result.chosen.accuracy:.4f}, latency {result.chosen.latency_ms:.3f} ms, "
                  f"{result.chosen.size_bytes / 1024:.0f} KiB.", ""]
    else:
        lines += ["No candidate met the accuracy budget.", ""]
    lines += ["## Candidates", "", result.table(), "", "![accuracy vs latency](accuracy_latency.png)", "",
              "![artifact size](size.png)", ""]
    if sens:
        lines += ["## Per-layer quantization sensitivity", "", "| layer | error |", "|---|---|"]
        lines += [f"| {s.get('layer')} | {float(s.get('error', 0.0)):.4g} |" for s in sens]
        lines += ["", "![sensitivity](sensitivity.png)", ""]
    lines += ["## Per-pass timing", ""]
    for c in ok:
        recs = [r for r in c.pass_records if "pass" in r]
        if recs:
            lines.append(f"**{c.name}**: " + ", ".join(f"{r['pass']} {1e3 * r['seconds']:.1f} ms" for r in recs))
            lines.append("")
    path = os.path.join(folder, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
