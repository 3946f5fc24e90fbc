"""Running cross-compiled fuzz builds: the ``build:arm64[...]`` stages, under qemu-aarch64.

A build for a target this machine cannot run (``arm64``, ``arm64-dotprod``, ``rpi4``: any preset with a
``cross_triple``) is saved as an artifact (cross-linked with the aarch64 toolchain) and run by one
:class:`~graphopt.targets.aarch64.session.EmulatorSession` per process, shared by every case, stage and
minimization step: the emulator and TVM's runtime start once per campaign (or once per fuzz worker process),
not once per graph. A kernel that kills the emulated process is an ``EmulationError`` for that batch, so
the harness re-runs it model by model and reports the culprit seed as a ``crash``; the session restarts
itself for the next job.

The emulation environment (qemu-user, the cached aarch64 sysroot) and the cross toolchain are installed on
first use where apt can (see graphopt.targets.aarch64.emulation); elsewhere every such stage fails with an
``EmulationError``/``ToolchainError`` that says what is missing.
"""

from __future__ import annotations

import atexit
import tempfile
import threading
from typing import Any, Sequence

import torch

_session = None
_session_lock = threading.Lock()


def session():
    """The process's shared EmulatorSession (started, with the toolchain checked, on first use)."""
    global _session
    with _session_lock:
        if _session is None:
            from graphopt.targets.aarch64 import toolchain
            from graphopt.targets.aarch64.session import EmulatorSession

            toolchain.ensure_cross_toolchain(install=toolchain.apt_unavailable_reason() is None)
            _session = EmulatorSession()
            atexit.register(close_session)
        return _session


def close_session() -> None:
    """Stop the shared emulated process (the next cross build starts a new one)."""
    global _session
    with _session_lock:
        if _session is not None:
            _session.close()
            _session = None


def is_cross_built(module: Any) -> bool:
    """Was this CompiledModule built for a machine other than this one (so it must run emulated)?"""
    target = module.manifest["target"]
    return bool(target.get("cross_triple")) and target["tvm"]["kind"] == "llvm"


def run_emulated(module: Any, inputs: Sequence[torch.Tensor],
                 timeout: float = 300.0) -> tuple[torch.Tensor, ...]:
    """Save ``module`` (an aarch64 CompiledModule) and run it in the shared emulated process."""
    with tempfile.TemporaryDirectory(prefix="graphopt-fuzz-arm64-") as tmp:
        path = module.save(f"{tmp}/artifact")
        outputs = session().run(path, [x.detach().contiguous().numpy() for x in inputs], timeout=timeout)
    return tuple(torch.from_numpy(o) for o in outputs)
