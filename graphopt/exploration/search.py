"""Search pipelines for the best accuracy / latency / size trade-off on a target.

Each candidate is a pipeline text, optionally split by a fine-tuning step (pruning is
followed by distillation from the original model when training data is given)::

    fold,prune{ratio=0.5}  --finetune-->  fuse,quantize{mode=int8}

For each candidate we optimize, (fine-tune), compile for the target, and measure the
user's metric on the compiled module, its latency and its artifact size: here, or with
``rpc=RPC(key, "host:port")`` on the device registered under ``key`` (exploration/rpc_device.py). Every finished
candidate is written to a cache file keyed by model, inputs, target, pipeline and the data
it was measured and built with (evaluation, calibration and training data, values
included), so an interrupted search resumes where it stopped and a search on other data
measures again. The result marks the Pareto front
(accuracy up, latency down, size down) and picks the fastest candidate whose accuracy drop
stays within the budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from graphopt.errors import GraphoptError, PipelineError
from graphopt.timing import median_ms


@dataclass(frozen=True)
class Candidate:
    name: str
    before: str  # pipeline text up to the fine-tuning point (or the whole pipeline)
    after: str = ""  # pipeline text after fine-tuning ("" when there is none)
    finetune: bool = False

    @property
    def pipeline(self) -> str:
        return ",".join(p for p in (self.before, self.after) if p)


@dataclass
class CandidateResult:
    name: str
    pipeline: str
    finetuned: bool
    accuracy: float | None = None
    accuracy_drop: float | None = None
    latency_ms: float | None = None
    size_bytes: int | None = None
    compile_s: float | None = None
    finetune_s: float | None = None
    error: str | None = None
    pareto: bool = False
    pass_records: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    before: str = ""  # the candidate's pipeline split at its fine-tuning step
    after: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_ms is not None


@dataclass
class ExploreResult:
    target: str
    baseline_accuracy: float
    max_accuracy_drop: float
    candidates: list[CandidateResult]
    chosen: CandidateResult | None
    report: str | None = None

    def table(self) -> str:
        fastest = min((c.latency_ms for c in self.candidates if c.ok), default=None)
        ref = next((c for c in self.candidates if c.ok), None)
        lines = ["| candidate | pipeline | accuracy | drop | latency ms | speed-up | size KiB | compile s | Pareto | |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for c in self.candidates:
            if not c.ok:
                lines.append(f"| {c.name} | `{c.pipeline}` | — | — | — | — | — | — | | failed: {c.error} |")
                continue
            speed = ref.latency_ms / c.latency_ms if ref else 1.0
            mark = "**chosen**" if self.chosen is c else ("fastest" if c.latency_ms == fastest else "")
            ft = " (+finetune)" if c.finetuned else ""
            lines.append(f"| {c.name} | `{c.pipeline}`{ft} | {c.accuracy:.4f} | {c.accuracy_drop:+.4f} | "
                         f"{c.latency_ms:.3f} | {speed:.2f}x | {c.size_bytes / 1024:.0f} | {c.compile_s:.1f} | "
                         f"{'yes' if c.pareto else ''} | {mark} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (f"explore on {self.target}: baseline accuracy {self.baseline_accuracy:.4f}, "
                f"budget {self.max_accuracy_drop:.4f}")
        chosen = (f"chosen pipeline: {self.chosen.pipeline}" if self.chosen else
                  "no candidate met the accuracy budget")
        return f"{head}\n\n{self.table()}\n\n{chosen}"


def default_candidates(target_features: Iterable[str], kind: str, with_training: bool,
                       prune_ratios: Sequence[float] = (0.25, 0.5),
                       sparsities: Sequence[float] = (0.5, 0.7, 0.9)) -> list[Candidate]:
    """The standard search space; passes that are not registered are skipped by the runner."""
    feats = set(target_features)
    cands = [
        Candidate("fused fp32", "fold,fuse"),
        Candidate("int8 static", "fold,quantize{mode=int8},fuse"),
        # accuracy-aware: measures every layer's sensitivity (plotted in the report) and
        # keeps the most sensitive ones in float until the output error is within 2%
        Candidate("int8 mixed", "fold,quantize{mode=int8,max_error=0.02},fuse"),
        # dynamic int8 builds unfused for now: its run-time scale tuple does not fit a fused kernel yet
        Candidate("int8 dynamic", "fold,quantize{mode=dynamic}"),
        # weight-only int4 of linear layers: pays on memory-bound (batch-1) linears; convs mostly stay float
        Candidate("int4 g32", "fold,quantize{mode=int4,group=32},fuse"),
        Candidate("int4 g128", "fold,quantize{mode=int4,group=128},fuse"),
    ]
    if kind == "cuda" or "neon" in feats or "avx512_fp16" in feats:
        cands.append(Candidate("fp16", "fold,quantize{mode=fp16},fuse"))
    if kind == "cuda" or feats & {"avx512_bf16", "amx_bf16"}:
        cands.append(Candidate("bf16", "fold,quantize{mode=bf16},fuse"))
    if with_training:
        for r in prune_ratios:
            cands.append(Candidate(f"prune {r:g}", f"fold,prune{{ratio={r:g}}}", "fuse", finetune=True))
        r = max(prune_ratios)
        cands.append(Candidate(f"prune {r:g} + int8", f"fold,prune{{ratio={r:g}}}", "quantize{mode=int8},fuse",
                               finetune=True))
        # fine-tuning keeps the sparsity's zeros (graphopt.finetune) and trains int4's scales
        for s in sparsities:
            cands.append(Candidate(f"sparsify {s:g}", f"fold,sparsify{{sparsity={s:g}}}", "fuse", finetune=True))
        cands.append(Candidate("int4 g32 + finetune", "fold,quantize{mode=int4,group=32}", "fuse", finetune=True))
    return cands


def make_metric(evaluate: Any, batch: int = 1) -> Callable[[Callable], float]:
    """A function module -> accuracy: ``evaluate`` itself, or accuracy on an (x, y) data set.

    Data sets are fed in chunks of ``batch`` (the example inputs' batch size; the last chunk
    padded), since a module compiled for a static batch accepts only that batch.
    """
    if callable(evaluate):
        return evaluate
    if isinstance(evaluate, (tuple, list)) and len(evaluate) == 2:
        x, y = (torch.as_tensor(t) for t in evaluate)

        def accuracy(module: Callable) -> float:
            preds = []
            with torch.no_grad():
                for i in range(0, len(x), batch):
                    chunk = x[i:i + batch]
                    n = len(chunk)
                    if n < batch:
                        chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
                    preds.append(torch.as_tensor(module(chunk))[:n].argmax(-1))
            return float((torch.cat(preds) == y).float().mean())

        return accuracy
    raise TypeError("evaluate must be a callable(module) -> float or an (inputs, labels) pair")


def _fingerprint(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for x in inputs:
        h.update(str((tuple(x.shape), str(x.dtype))).encode())
    return h.hexdigest()[:16]


def _data_digest(data: Any) -> str:
    """A hash of everything ``data`` holds that a candidate's result depends on.

    Tensors and arrays count with their values, containers with their structure. A callable
    (an ``evaluate`` metric) counts with its code and the data its closure holds: a metric
    reading a global dataset is keyed by its code alone, so pass ``(inputs, labels)`` to
    have the data keyed too. Other iterables (a DataLoader) are read once here."""
    import numpy as np

    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"array{x.shape}{x.dtype}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif x is None or isinstance(x, (bool, int, float, str)):
            h.update(repr(x).encode())
        elif isinstance(x, dict):
            h.update(f"dict{len(x)}".encode())
            for k in sorted(x, key=repr):
                visit(k)
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"seq{len(x)}".encode())
            for item in x:
                visit(item)
        elif callable(x):
            code = getattr(x, "__code__", None)
            h.update(f"fn {getattr(x, '__module__', '')}.{getattr(x, '__qualname__', type(x).__name__)}".encode())
            if code is not None:
                h.update(code.co_code)
                visit(code.co_consts)
            for cell in getattr(x, "__closure__", None) or ():
                contents = cell.cell_contents
                visit(contents if isinstance(contents, (torch.Tensor, np.ndarray, list, tuple, dict)) else
                      type(contents).__name__)
        elif hasattr(x, "__iter__"):
            visit(list(x))
        else:
            h.update(type(x).__name__.encode())

    visit(data)
    return h.hexdigest()[:16]


def _reusable(data: Any) -> Any:
    """``data`` as something that can be read more than once (a generator becomes a list)."""
    if data is not None and not isinstance(data, (list, tuple, dict, torch.Tensor)) and iter(data) is data:
        return list(data)
    return data


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def build_candidate(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], target: Any, cand: Candidate,
                    train_data: Any = None, calibration_data: Any = None, finetune_epochs: int = 3):
    """Optimize, fine-tune (pruned candidates) and compile one candidate: (graph, module, finetune seconds)."""
    import graphopt

    finetune_s = 0.0
    graph = graphopt.optimize(model, inputs, cand.before, calibration_data=calibration_data)
    if cand.finetune:
        t1 = time.perf_counter()
        # The captured graph's reshapes hold its example batch size, so fine-tune at that batch.
        xs, ys = _as_pair(train_data)
        graphopt.finetune(graph, (xs, ys), teacher=model, epochs=finetune_epochs, distill=True,
                          batch_size=int(inputs[0].shape[0]), progress=False)
        finetune_s = time.perf_counter() - t1
    if cand.after:
        graph = graphopt.optimize(graph, pipeline=cand.after, calibration_data=calibration_data)
    return graph, graphopt.compile(graph, target, pipeline="none"), finetune_s


def _as_pair(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from an (x, y) pair or an iterable of (x, y) batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    batches = list(data)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def run_candidate(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], target: Any, cand: Candidate,
                  metric: Callable, baseline: float, workdir: str, train_data: Any = None,
                  calibration_data: Any = None, finetune_epochs: int = 3, rpc: Any = None) -> CandidateResult:
    """Build ``cand`` and measure it: accuracy and latency here, or on the RPC device ``rpc``."""
    res = CandidateResult(cand.name, cand.pipeline, cand.finetune, before=cand.before, after=cand.after)
    try:
        t0 = time.perf_counter()
        graph, module, res.finetune_s = build_candidate(model, inputs, target, cand, train_data, calibration_data,
                                                        finetune_epochs)
        res.compile_s = time.perf_counter() - t0 - res.finetune_s
        path = module.save(os.path.join(workdir, "artifact"))
        res.size_bytes = _dir_size(path)
        if rpc is not None:
            from graphopt.exploration.rpc_device import RemoteModule

            remote = RemoteModule(path, rpc)
            res.accuracy = float(metric(remote))
            res.latency_ms = remote.latency_ms(*inputs)
        else:
            res.accuracy = float(metric(module))
            res.latency_ms = median_ms(lambda: module(*inputs), runs=20, warmup=1, budget_s=5.0)
        res.accuracy_drop = baseline - res.accuracy
        res.pass_records = list(graph.annotations.get("pass_records", []))
        res.sensitivity = list(graph.annotations.get("quant_sensitivity", []))
    except (GraphoptError, RuntimeError, ValueError, TypeError) as e:
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        res.pass_records = [{"traceback": traceback.format_exc(limit=3)}]
    return res


def candidate_of(result: CandidateResult) -> Candidate:
    """The Candidate a result came from (to rebuild it, e.g. the chosen one)."""
    return Candidate(result.name, result.before or result.pipeline, result.after, result.finetuned)


def pareto_front(results: list[CandidateResult]) -> None:
    """Mark candidates no other candidate beats on accuracy, latency and size at once."""
    ok = [r for r in results if r.ok]
    for r in ok:
        r.pareto = not any(
            o is not r and o.accuracy >= r.accuracy and o.latency_ms <= r.latency_ms and o.size_bytes <= r.size_bytes
            and (o.accuracy > r.accuracy or o.latency_ms < r.latency_ms or o.size_bytes < r.size_bytes)
            for o in ok)


def choose(results: list[CandidateResult], max_drop: float) -> CandidateResult | None:
    within = [r for r in results if r.ok and r.accuracy_drop <= max_drop + 1e-12]
    return min(within, key=lambda r: (r.latency_ms, r.size_bytes), default=None)


def explore(model: torch.nn.Module, example_inputs: Any, target: Any = "x86", evaluate: Any = None,
            max_accuracy_drop: float = 0.01, budget: float | None = None, train_data: Any = None,
            calibration_data: Any = None, candidates: Sequence[Candidate] | None = None,
            cache_dir: str = ".graphopt-explore", report_dir: str | None = None, finetune_epochs: int = 3,
            progress: bool = True, rpc: Any = None) -> ExploreResult:
    """Try candidate pipelines on ``target`` and pick the fastest within the accuracy budget.

    ``evaluate`` is ``callable(module) -> accuracy`` or an ``(inputs, labels)`` pair;
    ``train_data`` (an iterable of (x, y) batches) enables pruning with distillation;
    ``calibration_data`` (an iterable of input batches) feeds static int8 (defaults to the
    example inputs); ``budget`` caps the search in seconds; ``report_dir`` writes a
    Markdown report with plots; ``rpc`` (``RPC(key, "host:port")``, targets/tuning/options.py)
    measures every candidate on that device instead of this machine (any target, e.g. arm64).
    """
    from graphopt.capture import normalize_inputs
    from graphopt.passes_base import registered_passes
    from graphopt.pipeline import Pipeline
    from graphopt.targets.registry import resolve_target

    if evaluate is None:
        raise ValueError("explore needs evaluate=: a callable(module) -> accuracy or an (inputs, labels) pair")
    inputs = normalize_inputs(example_inputs)
    spec = resolve_target(target)
    if rpc is not None:
        from graphopt.targets.tuning.remote import check_device

        check_device(rpc)  # no tracker, or no such device: a TuningError now, not one per candidate
    metric = make_metric(evaluate, batch=int(inputs[0].shape[0]) if inputs[0].dim() else 1)
    model = model.eval()
    baseline = float(metric(lambda *xs: model(*xs)))
    if calibration_data is None:
        calibration_data = [inputs]
    # hashed for the cache key below and read again by every candidate
    calibration_data, train_data = _reusable(calibration_data), _reusable(train_data)
    cands = list(candidates) if candidates is not None else default_candidates(
        spec.features, spec.kind, train_data is not None)
    known = registered_passes()
    device = f"rpc:{rpc.key}@{rpc.tracker}" if rpc is not None else "local"
    key_base = (f"{_fingerprint(model, inputs)}-{spec.name}-{json.dumps(spec.tvm, sort_keys=True)}-{device}-"
                f"{_data_digest(evaluate)}-{_data_digest(calibration_data)}-{_data_digest(train_data)}")
    os.makedirs(cache_dir, exist_ok=True)

    results: list[CandidateResult] = []
    start = time.perf_counter()
    bar = _progress(len(cands), progress)
    for cand in cands:
        bar.set_description(cand.name)
        key = hashlib.sha256(f"{key_base}|{cand.pipeline}|{cand.finetune}|{finetune_epochs}".encode()).hexdigest()[:20]
        cache_file = os.path.join(cache_dir, f"{key}.json")
        if os.path.exists(cache_file):
            with open(cache_file) as f:
                results.append(CandidateResult(**json.load(f)))
            bar.update(1)
            continue
        if budget is not None and time.perf_counter() - start > budget:
            results.append(CandidateResult(cand.name, cand.pipeline, cand.finetune, error="skipped: time budget spent"))
            bar.update(1)
            continue
        try:
            for text in (cand.before, cand.after):
                if text:
                    Pipeline.parse(text)
        except PipelineError as e:
            missing = [p.split("{")[0] for p in cand.pipeline.split(",") if p.split("{")[0] not in known]
            reason = f"pass not available: {', '.join(missing)}" if missing else str(e)
            results.append(CandidateResult(cand.name, cand.pipeline, cand.finetune, error=reason))
            bar.update(1)
            continue
        workdir = os.path.join(cache_dir, key)
        res = run_candidate(model, inputs, spec, cand, metric, baseline, workdir, train_data, calibration_data,
                            finetune_epochs, rpc)
        results.append(res)
        if res.ok:  # failures are retried next time; successes are kept
            tmp = cache_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(asdict(res), f)
            os.replace(tmp, cache_file)
        bar.update(1)
    bar.close()
    pareto_front(results)
    result = ExploreResult(spec.name, baseline, max_accuracy_drop, results, choose(results, max_accuracy_drop))
    if report_dir:
        from graphopt.exploration.report import write_report

        result.report = write_report(result, report_dir)
    return result


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="candidate", disable=not enabled, leave=False)
