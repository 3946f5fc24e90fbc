"""Measure a candidate on a device behind a TVM RPC tracker (``explore(..., rpc=RPC(key, "host:port"))``).

The candidate's saved artifact (``model.so``, linked for the device: with the aarch64 cross
compiler for an aarch64 target) is uploaded to the device registered under ``key`` and loaded
in a Relax VM there. The metric calls it like a compiled module, one batch per round trip, and
its latency is timed on the device by TVM's time evaluator: the device's clock, not the
network's, so a slow link costs search time but does not change the numbers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from graphopt.errors import TuningError


class RemoteModule:
    """An artifact folder loaded on an RPC device: callable like ``CompiledModule``, timed there."""

    def __init__(self, artifact_dir: str, rpc: Any):
        from tvm import rpc as tvm_rpc
        from tvm.runtime.vm import VirtualMachine

        from graphopt.targets.tuning.remote import check_device

        check_device(rpc)  # a TuningError naming the devices the tracker has, before any upload
        with open(os.path.join(artifact_dir, "manifest.json")) as f:
            manifest = json.load(f)
        library, self.entry = manifest.get("library", "model.so"), manifest.get("entry", "main")
        host, port = rpc.host_port
        try:
            self.session = tvm_rpc.connect_tracker(host, port).request(
                rpc.key, priority=1, session_timeout=rpc.session_timeout_s)
            self.session.upload(os.path.join(artifact_dir, library))
            self.device = self.session.cpu()
            self.vm = VirtualMachine(self.session.load_module(library), self.device)
        except Exception as e:  # noqa: BLE001 - TVM's RPC errors are TVMErrors, socket errors OSErrors
            raise TuningError(f"loading {artifact_dir} on RPC device {rpc.key!r} at {rpc.tracker} failed: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}") from e

    def _tensors(self, inputs: tuple[Any, ...]) -> list[Any]:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(torch.as_tensor(x).detach().numpy()), self.device)
                for x in inputs]

    def __call__(self, *inputs: Any) -> Any:
        # the stateful calls: a tuple result does not cross RPC, its tensors one by one do
        self.vm.set_input(self.entry, *self._tensors(inputs))
        self.vm.invoke_stateful(self.entry)
        outputs = _flatten(self.vm.get_outputs(self.entry), [])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def latency_ms(self, *inputs: Any, repeat: int = 5, min_repeat_ms: int = 100) -> float:
        """Median over ``repeat`` timings on the device, each of enough runs to last ``min_repeat_ms``."""
        self.vm.set_input(self.entry, *self._tensors(inputs))
        timer = self.vm.time_evaluator("invoke_stateful", self.device, number=1, repeat=repeat,
                                       min_repeat_ms=min_repeat_ms)
        return float(timer(self.entry).median) * 1e3


def _flatten(value: Any, out: list) -> list:
    """The torch tensors of a VM result (a tensor, or a nested tuple of them), depth-first."""
    if hasattr(value, "numpy"):
        out.append(torch.from_numpy(value.numpy()))
    else:
        for item in value:
            _flatten(item, out)
    return out
