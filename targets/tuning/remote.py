"""Where tuning measurements run: this machine, or a device behind a TVM RPC tracker.

MetaSchedule measures a candidate in two steps: a *builder* compiles it into a library, a
*runner* loads the library on the device and times it. graphopt picks both from the target
and ``Tune.rpc``:

* local (no ``rpc``): TVM's LocalBuilder/LocalRunner, for host targets only — measuring an
  aarch64 kernel on x86 is impossible and says so (TuningError);
* remote (``rpc=RPC(key, "host:port")``): the RPCRunner asks the tracker for a device
  registered under ``key``, uploads the library and times it there. The device has only
  TVM's runtime — no compiler — so the builder links a finished shared library here (with
  the aarch64 cross compiler for aarch64 targets) instead of TVM's default ``.tar`` of
  objects, which the device would have to link itself.

Either runner is wrapped in ``MeasureInTurn``: a batch is timed before the search goes on.
MetaSchedule's runners are asynchronous, so a local measurement would run while the main
process searches the next task on the same cores, and the task scheduler only collects results
when it comes back to a task: with a few trials per task, every record of a run would wait in
memory until the last task has been searched (mobilenet_v2 at 8 trials per task: 15 minutes,
all lost to a Ctrl-C before the end).

``LoopbackCluster`` starts a tracker and RPC servers on 127.0.0.1 — one on this machine, or
an aarch64 one running under qemu-user in the emulated environment of targets/aarch64/emulation.py —
for tests and for trying remote tuning without a board.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from graphopt.errors import TuningError
from graphopt.targets.registry import TargetSpec

# Measurement settings: 3 runs per timing, at least 100 ms of them (MetaSchedule's defaults).
_EVALUATOR = dict(number=3, repeat=1, min_repeat_ms=100, enable_cpu_cache_flush=False)
# Per build / per measurement; MetaSchedule's 30 s default is too short for a loaded machine.
_TIMEOUT_S = 120


# -------------------------------------------------------------------- building candidates
def build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """Builder build step: MetaSchedule's default minus its ``import tvm.s_tir.tensor_intrin``,
    which registers every tensor intrinsic TVM has and costs ~60 s of CPU in each fresh builder
    process (MetaSchedule starts one per batch) — enough to hit the builder's timeout on a busy
    machine. graphopt's fp32 search spaces do not tensorize, so nothing needs them.
    Candidates are lowered by graphopt's TIR pipeline, as the final build is: the rules'
    prefetch and transpose annotations are code there, not no-ops."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from graphopt.targets.cpu.tir_pipeline import tir_pipeline_for

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target,
                     pipeline=tir_pipeline_for(target))


def export_host_library(mod: Any) -> str:
    """Builder export step for RPC devices of this machine's architecture: a linked ``.so``."""
    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "candidate.so")
    mod.export_library(path)
    return path


def export_aarch64_library(mod: Any) -> str:
    """Builder export step for aarch64 devices: a ``.so`` linked by the aarch64 cross compiler."""
    from graphopt.targets.aarch64.toolchain import cross_compiler_fcompile

    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "candidate.so")
    mod.export_library(path, fcompile=cross_compiler_fcompile("aarch64-linux-gnu"))
    return path


def builder_for(spec: TargetSpec, rpc: Any) -> Any:
    if spec.cross_triple and spec.arch == "aarch64":
        from graphopt.targets.aarch64.toolchain import ensure_cross_toolchain

        ensure_cross_toolchain()  # fail now, with the install command, not inside a build worker
        return ms.builder.LocalBuilder(f_build=build_candidate, f_export=export_aarch64_library,
                                       timeout_sec=_TIMEOUT_S)
    if rpc is not None:
        return ms.builder.LocalBuilder(f_build=build_candidate, f_export=export_host_library, timeout_sec=_TIMEOUT_S)
    return ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=_TIMEOUT_S)


def check_measurable(spec: TargetSpec, rpc: Any) -> None:
    """Raise TuningError when kernels for ``spec`` cannot be measured with ``rpc`` (None: here)."""
    if rpc is not None:
        check_device(rpc)
        return
    if spec.cross_triple:
        raise TuningError(f"target {spec.name} ({spec.cross_triple}) cannot be measured on this machine; "
                          "tune on the device over RPC: Tune(rpc=RPC(key, 'host:port')) or "
                          "`graphopt tune ... --rpc-key KEY --tracker HOST:PORT`")
    if spec.kind == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise TuningError(f"target {spec.name} needs a GPU to measure on and this machine has none; "
                              "tune over RPC on a machine that has one")


def runner_for(spec: TargetSpec, rpc: Any) -> Any:
    evaluator = ms.runner.EvaluatorConfig(**_EVALUATOR)
    check_measurable(spec, rpc)
    if rpc is None:
        return MeasureInTurn(ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=_TIMEOUT_S))
    host, port = rpc.host_port
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc.key,
                                 session_priority=1, session_timeout_sec=rpc.session_timeout_s)
    return MeasureInTurn(ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1))


@derived_object
class MeasureInTurn(ms.runner.PyRunner):
    """A runner that returns a batch only once it is measured (see the module doc).

    With its futures already done, a round-robin task scheduler collects the batch at its
    next step, so the measure callbacks (the records on disk, the progress bar) run right
    after each batch, and nothing else runs on the cores while a batch is timed."""

    def __init__(self, inner: Any):
        super().__init__()
        self.inner = inner

    def run(self, runner_inputs: list) -> list:
        futures = self.inner.run(runner_inputs)
        for future in futures:
            future.result()  # blocks until measured (or failed: the result says so)
        return futures


def check_device(rpc: Any, timeout_s: float = 0.0) -> None:
    """Raise TuningError unless the tracker answers and has a device ``rpc.key`` (waits up to timeout_s)."""
    from tvm import rpc as tvm_rpc

    host, port = rpc.host_port
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            summary = tvm_rpc.connect_tracker(host, port).summary()
        except Exception as e:  # noqa: BLE001 - socket and TVM errors alike mean "no tracker there"
            summary, error = None, e
        else:
            error = None
            keys = {k for k, v in summary.get("queue_info", {}).items() if v.get("free", 0) + v.get("pending", 0) >= 0}
            servers = {s.get("key", "").split(":")[-1] for s in summary.get("server_info", [])}
            if rpc.key in keys | servers:
                return
        if time.monotonic() >= deadline:
            if summary is None:
                raise TuningError(f"no RPC tracker answers at {rpc.tracker}: {error}")
            raise TuningError(f"the RPC tracker at {rpc.tracker} has no device with key {rpc.key!r} "
                              f"(devices: {', '.join(sorted(servers)) or 'none'})")
        time.sleep(0.5)


# -------------------------------------------------------------------- loopback cluster
class LoopbackCluster:
    """A TVM RPC tracker and servers on 127.0.0.1 (a context manager; stops them all on exit)."""

    def __init__(self):
        from tvm.rpc.tracker import Tracker

        self.tracker = Tracker(host="127.0.0.1", port=19190, port_end=19390, silent=True)
        self.address = f"127.0.0.1:{self.tracker.port}"
        self._servers: list[Any] = []
        self._procs: list[subprocess.Popen] = []

    def add_host_server(self, key: str) -> None:
        """An RPC server of this machine, registered under ``key``."""
        from tvm import rpc

        self._servers.append(rpc.Server(host="127.0.0.1", port=19400, port_end=19600, key=key,
                                        tracker_addr=("127.0.0.1", self.tracker.port), silent=True))

    def add_emulated_aarch64_server(self, key: str, env: Any = None, port: int = 19700) -> None:
        """An aarch64 RPC server under qemu-user (``env``: an EmulatorEnv; built/cached if None)."""
        from graphopt.targets.aarch64.emulation import ensure_aarch64_sysroot

        env = env or ensure_aarch64_sysroot()
        # Not `python -m tvm.exec.rpc_server`: that runs the server in a PopenWorker, a child
        # started by exec'ing sys.executable — an aarch64 binary the host kernel cannot exec
        # without qemu. The server's own loop, run in this process, only forks per session.
        script = ("import time\n"
                  "from tvm.rpc.server import _popen_start_rpc_server\n"
                  f"_popen_start_rpc_server('127.0.0.1', {port}, {port + 100}, "
                  f"tracker_addr=('127.0.0.1', {self.tracker.port}), key={key!r}, silent=True)\n"
                  "while True:\n    time.sleep(3600)\n")
        cmd = [env.qemu, "-L", str(env.sysroot), str(env.python), "-c", script]
        log = tempfile.TemporaryFile()
        self._procs.append(subprocess.Popen(cmd, env=env.environment(), stdout=log, stderr=subprocess.STDOUT))
        self._logs = getattr(self, "_logs", []) + [log]

    def wait_for(self, key: str, timeout_s: float = 180.0) -> None:
        from graphopt.targets.tuning.options import RPC

        for proc, log in zip(self._procs, getattr(self, "_logs", [])):
            if proc.poll() is not None:
                log.seek(0)
                raise TuningError(f"RPC server exited with {proc.returncode}: {log.read().decode()[-2000:]}")
        check_device(RPC(key, self.address), timeout_s=timeout_s)

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for server in self._servers:
            server.terminate()
        self.tracker.terminate()

    def __enter__(self) -> "LoopbackCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
