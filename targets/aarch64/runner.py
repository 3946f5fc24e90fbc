"""Run a graphopt artifact on the machine this script runs on; used under qemu-aarch64 by ``emulation.py``.

This file is executed as a *script* by the aarch64 Python of the emulated board, whose environment holds only
the standard library, numpy and the TVM runtime: it must never import torch or graphopt. It is also a plain
on-device runner: copy it next to an artifact on a real arm64 board and run it there.

Protocol (files, because the emulator is a separate process with its own interpreter):

    python3 runner.py ARTIFACT_DIR INPUTS.npz OUTPUTS.npz
    python3 runner.py --serve

* ``INPUTS.npz`` holds the inputs as ``arg0, arg1, ...`` in the order of the entry function's parameters.
* ``OUTPUTS.npz`` receives the outputs as ``out0, out1, ...``, the VM's result flattened depth-first
  (a single tensor, or a tuple/array of them, possibly nested).
* On success the script prints one JSON line ``{"load_s": ..., "run_s": ..., "outputs": n}`` to stdout.
* Errors go to stderr with a non-zero exit status: 2 for a bad artifact or bad inputs, 1 for anything TVM
  raises, so the host can tell the two apart.

``--serve`` runs many artifacts in one process: starting the emulated interpreter and importing TVM costs
seconds under qemu, running a small model milliseconds. Each stdin line is a JSON job
``{"artifact": DIR, "inputs": IN.npz, "outputs": OUT.npz}``; each job gets one stdout line, ``REPLY_PREFIX``
followed by JSON: ``{"ok": true, "load_s", "run_s", "outputs"}`` or ``{"ok": false, "status": 2|1, "error"}``
(the statuses of the one-shot form). The prefix keeps replies apart from anything a library prints. EOF on
stdin ends the process; a job that kills the process (SIGSEGV, SIGILL in a kernel) ends it too, and the host
sees EOF on stdout without a reply.

TVM is imported runtime-only (``TVM_USE_RUNTIME_LIB=1``, unless the caller set it): the artifact needs only
``libtvm_runtime``, and not loading the LLVM-linked compiler library saves seconds under emulation.
``tvm.runtime.vm.VirtualMachine`` is the same class as ``tvm.relax.VirtualMachine``, which cannot be imported
in runtime-only mode.
"""

from __future__ import annotations

import json
import os
import sys
import time

FORMAT = "graphopt-artifact"
FORMAT_VERSIONS = (1,)
REPLY_PREFIX = "@graphopt-runner "


class RunnerInputError(Exception):
    """The artifact or the inputs are unusable (exit status 2)."""


def _read_manifest(artifact_dir):
    path = os.path.join(artifact_dir, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise RunnerInputError(f"cannot read {path}: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in FORMAT_VERSIONS:
        raise RunnerInputError(
            f"{path} is not a {FORMAT} manifest of version {FORMAT_VERSIONS} "
            f"(format={manifest.get('format')!r}, format_version={manifest.get('format_version')!r})"
        )
    return manifest


def _flatten(value, out):
    """Append the numpy arrays of a VM result (tensor, or nested tuple/Array of tensors) to ``out``."""
    if hasattr(value, "numpy"):
        out.append(value.numpy())
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        for item in value:
            _flatten(item, out)
    else:
        raise RunnerInputError(f"the entry function returned a {type(value).__name__}, not tensors")
    return out


def run(artifact_dir, inputs_path, outputs_path, report=print):
    """Run one artifact on the inputs file, write the outputs file; returns the timing record, which
    ``report`` (print by default) receives as one JSON line."""
    import numpy as np

    manifest = _read_manifest(artifact_dir)
    with np.load(inputs_path) as data:
        names = sorted(
            data.files, key=lambda k: int(k[3:]) if k.startswith("arg") and k[3:].isdigit() else -1
        )
        if any(not (k.startswith("arg") and k[3:].isdigit()) for k in names):
            raise RunnerInputError(f"{inputs_path}: keys must be arg0, arg1, ...; got {data.files}")
        inputs = [data[k] for k in names]
    declared = manifest.get("inputs")
    if declared is not None and len(declared) != len(inputs):
        raise RunnerInputError(f"the artifact takes {len(declared)} inputs, {len(inputs)} were given")

    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import tvm
    from tvm.runtime.vm import VirtualMachine

    start = time.perf_counter()
    lib = tvm.runtime.load_module(os.path.join(artifact_dir, manifest.get("library", "model.so")))
    vm = VirtualMachine(lib, tvm.cpu())
    loaded = time.perf_counter()
    result = vm[manifest.get("entry", "main")](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs])
    outputs = _flatten(result, [])
    done = time.perf_counter()
    np.savez(outputs_path, **{f"out{i}": a for i, a in enumerate(outputs)})
    timing = {"load_s": round(loaded - start, 3), "run_s": round(done - loaded, 3), "outputs": len(outputs)}
    if report is not None:
        report(json.dumps(timing))
    return timing


def serve(stdin, stdout):
    """Answer jobs from ``stdin`` until EOF (see the module docstring)."""
    import traceback

    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import numpy  # noqa: F401 - imported once here, not inside the first job's timing
    import tvm  # noqa: F401

    stdout.write(REPLY_PREFIX + json.dumps({"ready": True}) + "\n")
    stdout.flush()
    for line in stdin:
        if not line.strip():
            continue
        try:
            job = json.loads(line)
            paths = (job["artifact"], job["inputs"], job["outputs"])
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"ok": False, "status": 2, "error": f"bad job line {line.strip()[:200]!r}: {exc!r}"}
            stdout.write(REPLY_PREFIX + json.dumps(reply) + "\n")
            stdout.flush()
            continue
        try:
            reply = {"ok": True, **run(*paths, report=None)}
        except RunnerInputError as exc:
            reply = {"ok": False, "status": 2, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - anything TVM raises is the job's result, not the server's end
            tail = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-5:]
            reply = {"ok": False, "status": 1, "error": "\n".join(tail)}
        stdout.write(REPLY_PREFIX + json.dumps(reply) + "\n")
        stdout.flush()
    return 0


def main(argv):
    if argv == ["--serve"]:
        return serve(sys.stdin, sys.stdout)
    if len(argv) != 3:
        print(
            f"usage: {os.path.basename(__file__)} ARTIFACT_DIR INPUTS.npz OUTPUTS.npz  |  --serve",
            file=sys.stderr,
        )
        return 2
    try:
        run(*argv)
    except RunnerInputError as exc:
        print(f"aarch64_runner: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
