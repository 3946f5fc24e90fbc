"""One emulated aarch64 process that runs many artifacts: :class:`EmulatorSession`.

:func:`graphopt.targets.aarch64.emulation.run_artifact_emulated` starts ``qemu-aarch64`` once per artifact. Starting
the emulated CPython and importing TVM's runtime costs ~2-4 s of emulation, while a small model runs in
milliseconds; fuzzing hundreds of graphs or checking five reference models that way spends nearly all its
time starting up. A session starts ``runner.py --serve`` once and sends it one job per artifact
(a JSON line naming the artifact folder and two ``.npz`` files in the session's scratch folder); the
runner answers each with one JSON line.

Failures stay per artifact:

* an error the runner catches (bad artifact, TVM raising) is an :class:`EmulationError` for that job,
  and the process keeps serving;
* a job that kills the process (SIGSEGV/SIGILL in a compiled kernel) or outlives its timeout (the process
  is killed then) is an :class:`EmulationError` too; the next :meth:`EmulatorSession.run` starts a fresh
  process (``starts`` counts them), so a campaign goes on and a batch can be re-run model by model.

The process reads jobs from a pipe: if the host dies, the pipe closes and the emulated runner exits.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from graphopt.errors import EmulationError

from .emulation import RUNNER_SCRIPT, EmulatorEnv, ensure_aarch64_sysroot, validate_artifact

# Must equal runner.REPLY_PREFIX (that file is a script for the emulated Python, not imported here).
REPLY_PREFIX = "@graphopt-runner "
# Starting the emulated interpreter and importing numpy + tvm's runtime: ~2-4 s; generous for a busy host.
START_TIMEOUT_S = 300.0


class EmulatorSession:
    """``session.run(artifact_dir, inputs) -> outputs`` for many artifacts, in one emulated process.

    Use as a context manager (or call :meth:`close`). ``env`` defaults to the cached environment of
    :func:`~graphopt.targets.aarch64.emulation.ensure_aarch64_sysroot`, built on first use. Thread-safe: jobs
    run one at a time.
    """

    def __init__(self, env: EmulatorEnv | None = None) -> None:
        self._env = env
        self._proc: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._stderr = None
        self._scratch = tempfile.TemporaryDirectory(prefix="graphopt-emulator-session-")
        self._lock = threading.Lock()
        self.starts = 0  # emulated processes started (1 while nothing crashed)
        self.runs = 0  # jobs answered

    @property
    def env(self) -> EmulatorEnv:
        if self._env is None:
            self._env = ensure_aarch64_sysroot()
        return self._env

    # ------------------------------------------------------------------------------------ process
    def _start(self) -> None:
        env = self.env
        self._stderr = tempfile.TemporaryFile(mode="w+", dir=self._scratch.name)
        self._replies = queue.Queue()
        self._proc = subprocess.Popen(
            env.command(RUNNER_SCRIPT, ["--serve"]),
            env=env.environment(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self.starts += 1
        # A thread turns stdout into reply lines, so waiting for one can time out (a pipe read cannot).
        threading.Thread(target=self._read_replies, args=(self._proc, self._replies), daemon=True).start()
        ready = self._reply(START_TIMEOUT_S, "starting the emulated runner")
        if not ready.get("ready"):
            self._stop()
            raise EmulationError(f"the emulated runner did not start properly: {ready}")

    @staticmethod
    def _read_replies(proc: subprocess.Popen[str], replies: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None  # noqa: S101 - Popen was given stdout=PIPE
        for line in proc.stdout:
            if line.startswith(REPLY_PREFIX):
                replies.put(line[len(REPLY_PREFIX):])
        replies.put(None)  # EOF: the process ended

    def _stderr_tail(self, lines: int = 20) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return "\n".join(self._stderr.read().strip().splitlines()[-lines:])

    def _reply(self, timeout: float, doing: str) -> dict:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            tail = self._stderr_tail()
            self._stop()
            raise EmulationError(f"{doing}: no answer from the emulated runner within {timeout:.0f} s "
                                 f"(killed it){':' if tail else ''}\n{tail}".rstrip()) from None
        if line is None:
            status = _reap(self._proc) if self._proc is not None else None
            tail = self._stderr_tail()
            self._stop()
            raise EmulationError(f"{doing}: the emulated runner died (exit status {status}; a negative status "
                                 f"is the signal that killed it){':' if tail else ''}\n{tail}".rstrip())
        return json.loads(line)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    assert proc.stdin is not None  # noqa: S101 - Popen was given stdin=PIPE
                    proc.stdin.close()  # EOF: the runner exits on its own
                    proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    _reap(proc)
            elif proc.stdin is not None:
                proc.stdin.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    # ------------------------------------------------------------------------------------ jobs
    def run(
        self, artifact_dir: str | os.PathLike[str], inputs: Sequence[np.ndarray], timeout: float = 300.0
    ) -> list[np.ndarray]:
        """Run one aarch64 artifact emulated; its outputs, flattened in order (as run_artifact_emulated).

        Raises:
            ArtifactError, InputError: the artifact or the inputs are unusable (checked on the host first).
            EmulationError: the run failed, killed the emulated process or exceeded ``timeout`` seconds.
        """
        artifact, arrays = validate_artifact(artifact_dir, inputs)
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._stop()
                self._start()
            scratch = Path(self._scratch.name)
            in_path, out_path = scratch / f"job{self.runs}_in.npz", scratch / f"job{self.runs}_out.npz"
            np.savez(in_path, **{f"arg{i}": a for i, a in enumerate(arrays)})
            job = {"artifact": str(artifact.resolve()), "inputs": str(in_path), "outputs": str(out_path)}
            try:
                assert self._proc is not None and self._proc.stdin is not None  # noqa: S101 - started above
                try:
                    self._proc.stdin.write(json.dumps(job) + "\n")
                    self._proc.stdin.flush()
                except BrokenPipeError:
                    pass  # the process died; _reply reports it with its exit status
                reply = self._reply(timeout, f"emulated run of artifact {artifact}")
                self.runs += 1
                if not reply.get("ok"):
                    raise EmulationError(f"emulated run of artifact {artifact} failed "
                                         f"(status {reply.get('status')}):\n{reply.get('error', '')}")
                with np.load(out_path) as data:
                    return [data[f"out{i}"] for i in range(len(data.files))]
            finally:
                in_path.unlink(missing_ok=True)
                out_path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._stop()
        self._scratch.cleanup()

    def __enter__(self) -> EmulatorSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten session must not leave an emulator behind
        if getattr(self, "_proc", None) is not None:
            self._stop()


def _reap(proc: subprocess.Popen[str], grace_s: float = 10.0) -> int | None:
    """The exit status of ``proc``, killing it if it has not exited within ``grace_s`` (its stdout closed
    does not prove it is gone); None if even a killed process cannot be reaped (stuck in the kernel)."""
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        return None
