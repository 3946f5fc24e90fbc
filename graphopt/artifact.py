"""Compiled modules and the artifacts they are saved as.

An artifact is a folder::

    out/model.so        the TVM Relax VM executable, a shared library (cross-compiled for ARM)
    out/manifest.json   what it is: versions, target, pipeline, input/output specs, SHA-256

``CompiledModule.save`` writes both into a temporary sibling folder, fsync'd, and swaps it
into place; it never replaces a folder that is not a graphopt artifact, and a save killed
midway leaves the old artifact or the new one (graphopt/artifact_folder.py). ``graphopt.load``
needs neither the original model nor its Python code; it checks the manifest, the library's
hash, the target against this machine (architecture and CPU features) and the TVM version
before loading, and every call checks input shapes and dtypes against the manifest. The manifest
holds no timestamps: compiling the same model with the same pipeline twice gives byte-identical
manifests.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import tempfile
import threading
from typing import Any, Sequence

import numpy as np

from graphopt.artifact_folder import (FORMAT, FORMAT_VERSION, LIBRARY, MANIFEST, checked_library,  # noqa: F401
                                      read_manifest, sha256_file, write_folder_atomically)
from graphopt.cpu_features import check_cpu_features
from graphopt.errors import ArtifactError, InputError
from graphopt.graph import TensorSpec, check_dim_sizes, check_shape
from graphopt.signature import flatten_call, output_builder, spec_from_json, takes_flat_positional

# TVM kernels assume 64-byte aligned buffers (its default data_alignment) and check it on entry
_ALIGN = 64


def configure_tvm_threads() -> None:
    """Configure TVM's thread pool before its first parallel kernel starts it.

    Threads: TVM's runtime uses one unless told otherwise (see shared notes); use every core
    we may run on, unless the user chose a number.

    Pinning: TVM pins worker i to core i by default, and its kernels split every parallel loop
    into one fixed share per thread. When another process runs on one of those cores, the
    pinned worker cannot move to a free one, and every parallel region waits for it a
    scheduler time slice: mobilenet_v2 took 152-192 ms a call instead of 3.7 ms next to one
    busy process on this 2-core machine, and 1.8 ms either way when the machine was quiet.
    ONNX Runtime and PyTorch's OpenMP do not pin by default either. Users who own the cores
    can still set TVM_BIND_THREADS=1.

    Sharing (opt-in, GRAPHOPT_SHARE_TORCH_THREADS=1): kernels loaded from here on run their
    parallel loops on torch's OpenMP threads (graphopt/threads.py), so torch ops and compiled
    calls in one process do not spin against each other.
    """
    if "TVM_NUM_THREADS" not in os.environ:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:
            n = os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(n)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    from graphopt.threads import share_torch_threads

    share_torch_threads()


def _vm_ready(t: Any) -> bool:
    """A torch tensor the VM can read in place: CPU, dense, aligned like TVM's own buffers."""
    return t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad and t.data_ptr() % _ALIGN == 0


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """A dense copy of `a` whose data starts on an _ALIGN boundary. numpy's own copies come
    from malloc and are only 16-byte aligned, which TVM's aligned vector loads fault on."""
    buf = np.empty(a.nbytes + _ALIGN, dtype=np.uint8)
    start = -buf.ctypes.data % _ALIGN
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _torch_to_numpy(t: Any) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory; bf16 (which torch will not hand to
    numpy) as ml_dtypes' bfloat16, the type TVM's runtime reads it as."""
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _numpy_to_torch(a: np.ndarray) -> Any:
    """The inverse of _torch_to_numpy."""
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _numpy_vm_arg(a: np.ndarray) -> Any:
    """A numpy input as the VM reads it: in place when aligned; bf16 copied into a TVM tensor,
    since numpy's DLPack export has no bf16."""
    if a.dtype.name == "bfloat16":
        from tvm.runtime import tensor

        return tensor(a)
    return a if a.ctypes.data % _ALIGN == 0 else _aligned_copy(a)


class CompiledModule:
    """A model compiled for one target: call it with torch tensors or numpy arrays.

    Returns what the model returned: one tensor, or a tuple for several outputs (torch
    tensors when called with torch tensors, numpy arrays otherwise). Safe to call from
    several threads: each thread gets its own VM over the shared executable.
    """

    def __init__(self, executable: Any, manifest: dict[str, Any], path: str | None = None):
        configure_tvm_threads()
        self.executable = executable
        self.manifest = manifest
        self.path = path
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]
        self._read_call_structure(manifest)
        self.stats: dict[str, Any] = {}
        self._local = threading.local()
        self._shared_outputs: frozenset[int] | None = None  # found on the first call

    # ----------------------------------------------------------------- calling
    @property
    def target_name(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def pipeline(self) -> str:
        return self.manifest.get("pipeline", "")

    @functools.cached_property
    def _device(self):
        import tvm

        return tvm.cuda(0) if self.manifest["target"]["tvm"]["kind"] == "cuda" else tvm.cpu(0)

    def _vm(self):
        vm = getattr(self._local, "vm", None)
        if vm is None:
            from tvm import relax

            if self.manifest["target"].get("cross_triple") and self.manifest["target"]["tvm"]["kind"] == "llvm":
                raise ArtifactError(f"this module was built for {self.manifest['target']['name']} "
                                    f"({self.manifest['target']['cross_triple']}); run it on that device")
            # before the first kernel: code for CPU features this machine lacks dies with SIGILL
            check_cpu_features(self.manifest, f"module {self.manifest.get('name', '')!r}")
            vm = relax.VirtualMachine(self.executable, self._device)
            self._local.vm = vm
        return vm

    @functools.cached_property
    def _on_cpu(self) -> bool:
        return self._device.dlpack_device_type() == 1  # kDLCPU

    def _read_call_structure(self, manifest: dict[str, Any]) -> None:
        """How the model is called and what it returns (graphopt/signature.py)."""
        try:
            self.in_spec = spec_from_json(manifest.get("input_spec"))
            self.out_spec = spec_from_json(manifest.get("output_spec"))
            self.dim_ranges = {k: (int(lo), None if hi is None else int(hi))
                               for k, (lo, hi) in manifest.get("dim_ranges", {}).items()}
        except Exception as e:  # malformed JSON structure of any kind
            raise ArtifactError(f"manifest: unreadable input/output structure ({type(e).__name__}: {e})") from e
        self._flat_call = takes_flat_positional(self.in_spec)
        self._build_outputs = output_builder(self.out_spec, len(self.outputs))

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        """Call with the model's positional and keyword inputs; returns the model's output
        structure (a tensor, tuple, list, dict, dataclass or ModelOutput, as it returned).
        A ModelOutput or dataclass whose class cannot be imported here comes back as a dict
        with the same keys (graphopt/signature.py)."""
        if kwargs or not self._flat_call:
            inputs = flatten_call(self.in_spec, inputs, kwargs)
        on_cpu = self._on_cpu
        if on_cpu:  # tensors cross into TVM without a copy
            args, as_torch = self._cpu_args(inputs)
        else:
            from tvm.runtime import tensor

            arrays, as_torch = self._check_inputs(inputs)
            args = [tensor(a, self._device) for a in arrays]
        results = self._run(args)
        if as_torch and on_cpu:
            import torch

            # The VM's fresh output buffers go to torch without a copy; torch's reference keeps
            # them alive and the VM allocates new ones on the next call. Called with torch
            # tensors, tvm-ffi already returns torch tensors (DLPack's C exchange API):
            # converting them again cost ~5 us a call, more than the whole MLP's kernels.
            # Outputs that are not fresh (a constant, an input passed through) are copied:
            # handing them out would let the caller's in-place edits reach the module or the
            # inputs.
            outs = [r if isinstance(r, torch.Tensor) else torch.from_dlpack(r) for r in results]
            shared = self._shared_outputs
            if shared:
                outs = [o.clone() if i in shared else o for i, o in enumerate(outs)]
        else:
            outs = [r.numpy() for r in results]
            if as_torch:
                import torch

                outs = [_numpy_to_torch(o) for o in outs]
        return self._build_outputs(outs)

    def _run(self, args: list[Any]) -> list[Any]:
        results = self._call_vm(args)
        if self._shared_outputs is None:
            # Which outputs are not fresh buffers? Call again while the first results are
            # alive: a fresh output cannot land in memory that is still in use.
            again = self._call_vm(args)
            self._shared_outputs = frozenset(i for i, (a, b) in enumerate(zip(results, again))
                                             if a.data_ptr() == b.data_ptr())
        return results

    def _call_vm(self, args: list[Any]) -> list[Any]:
        """The VM's outputs as a list (it returns a bare tensor for one output, else a tuple)."""
        result = self._entry()(*args)
        return [result] if hasattr(result, "shape") else list(result)

    def _entry(self):
        """This thread's VM function: looked up once per thread, not per call."""
        fn = getattr(self._local, "entry", None)
        if fn is None:
            fn = self._local.entry = self._vm()[self.manifest.get("entry", "main")]
        return fn

    def _cpu_args(self, inputs: Sequence[Any]) -> tuple[list[Any], bool]:
        """Fast path on CPU: torch tensors whose shape and dtype are exactly the last call's
        go to the VM as they are (DLPack, zero copy); anything else takes the full check."""
        fast = getattr(self._local, "fast", None)
        if fast is not None and len(inputs) == len(fast[1]):
            tensor_type, specs = fast
            args = []
            for x, (shape, dtype) in zip(inputs, specs):
                if not (isinstance(x, tensor_type) and x.shape == shape and x.dtype == dtype and _vm_ready(x)):
                    break
                args.append(x)
            else:
                return args, True
        arrays, as_torch = self._check_inputs(inputs)
        if as_torch:
            import torch

            args = [_numpy_to_torch(a) for a in arrays]  # views of the (contiguous, CPU) inputs
            if all(_vm_ready(a) for a in args):
                self._local.fast = (torch.Tensor, [(a.shape, a.dtype) for a in args])
            args = [t if _vm_ready(t) else _numpy_to_torch(_aligned_copy(a)) for t, a in zip(args, arrays)]
            return args, True
        return [_numpy_vm_arg(a) for a in arrays], False

    def _check_inputs(self, inputs: Sequence[Any]) -> tuple[list[np.ndarray], bool]:
        if len(inputs) != len(self.inputs):
            names = ", ".join(s.name for s in self.inputs)
            raise InputError(f"expected {len(self.inputs)} input(s) ({names}), got {len(inputs)}")
        arrays, as_torch = [], False
        for spec, x in zip(self.inputs, inputs):
            if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
                as_torch = True
                # the dtype first: torch hands neither bf16 nor every other dtype to numpy
                check_shape(spec, tuple(x.shape), str(x.dtype).removeprefix("torch."))
                x = _torch_to_numpy(x.detach().cpu().contiguous())
            if not isinstance(x, np.ndarray):
                raise InputError(f"input {spec.name!r}: expected a torch.Tensor or numpy array, "
                                 f"got {type(x).__name__}")
            check_shape(spec, tuple(x.shape), str(x.dtype))
            arrays.append(np.require(x, requirements="C"))  # ascontiguousarray makes 0-d 1-d
        check_dim_sizes(self.inputs, [a.shape for a in arrays], self.dim_ranges)
        return arrays, as_torch

    # ------------------------------------------------------------------ saving
    def save(self, path: str, fcompile: Any = None) -> str:
        """Write the artifact folder ``path``; returns its absolute path.

        ``path`` may be new, an empty folder or an artifact (replaced); anything else is an
        ArtifactError and left as it is. A save killed midway leaves the old artifact or the
        new one in place (graphopt/artifact_folder.py says exactly what reaches the disk)."""
        path = os.path.abspath(path)
        if fcompile is None and self.manifest["target"].get("cross_triple"):
            from graphopt.targets.aarch64.toolchain import cross_compiler_fcompile

            fcompile = cross_compiler_fcompile(self.manifest["target"]["cross_triple"])
        written: dict[str, Any] = {}

        def write(folder: str) -> None:
            lib = os.path.join(folder, LIBRARY)
            if fcompile is not None:
                self.executable.export_library(lib, fcompile=fcompile)
            else:
                self.executable.export_library(lib)
            written.update(self.manifest, library=LIBRARY, sha256=sha256_file(lib))
            with open(os.path.join(folder, MANIFEST), "w") as f:
                json.dump(written, f, indent=2, sort_keys=True)
                f.write("\n")

        write_folder_atomically(path, write)
        self.manifest = written
        self.path = path
        return path

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.inputs)
        return f"<CompiledModule {self.manifest.get('name', '')} target={self.target_name} ({ins})>"


def load(path: str) -> CompiledModule:
    """Load an artifact folder written by ``CompiledModule.save`` (no model code needed)."""
    import tvm

    path = os.path.abspath(path)
    manifest = read_manifest(path)
    lib = checked_library(path, manifest)
    built, here = manifest["tvm_version"], tvm.__version__
    if built.split(".")[:2] != here.split(".")[:2]:
        raise ArtifactError(f"artifact {path} was built with TVM {built}; this runtime is TVM {here}")
    target = manifest["target"]
    kind = target["tvm"]["kind"]
    triple = target["tvm"].get("mtriple", "") if kind == "llvm" else (target.get("host") or {}).get("mtriple", "")
    machine = platform.machine()
    if triple and not triple.startswith(machine):
        raise ArtifactError(f"artifact {path} was built for {target['name']} ({triple}); this machine is "
                            f"{machine}: copy it to the device (or run it under emulation)")
    if kind == "cuda" and not tvm.cuda(0).exist:
        raise ArtifactError(f"artifact {path} was built for {target['name']} (CUDA) and this machine has no GPU")
    check_cpu_features(manifest, f"artifact {path}")
    configure_tvm_threads()  # before the library is loaded: loading fills in its thread pool's entry points
    try:
        module = _load_library_copy(lib)
    except ArtifactError:
        raise
    except Exception as e:  # TVM reports dlopen failures as its own error type
        raise ArtifactError(f"artifact {path}: cannot load {manifest['library']}: "
                            f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from e
    return CompiledModule(module, manifest, path=path)


def _load_library_copy(lib: str) -> Any:
    """Load the library ``lib`` from a private copy.

    dlopen knows libraries by path: loading a path again in the same process returns the
    library loaded first, even after the file was replaced (an artifact saved again over the
    same folder), and the module would silently compute the old model. A fresh copy has a
    fresh path; it is deleted once loaded (the mapping outlives the file)."""
    import tvm

    with tempfile.TemporaryDirectory(prefix="graphopt-load-") as tmp:
        copy = os.path.join(tmp, os.path.basename(lib))
        shutil.copyfile(lib, copy)
        return tvm.runtime.load_module(copy)
