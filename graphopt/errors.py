"""Typed errors raised by graphopt.

Every error a user can trigger is a ``GraphoptError`` subclass whose *second* base is the
builtin category it belongs to, so callers can catch either ours or the builtin
(``except ValueError`` still works for a malformed pipeline string). Each class docstring
carries an example message; tests check the messages.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class CaptureError(GraphoptError, RuntimeError):
    """The model could not be captured as a graph.

    Example: ``cannot capture MyModel: data-dependent control flow at model.py:12
    (`if x.sum() > 0:`)``
    """


class UnsupportedOpError(GraphoptError, NotImplementedError):
    """An operator in the graph has no lowering for the chosen target.

    Example: ``operator aten.cummax.default (node 'cummax', from model.py:7) is not supported
    by the TVM backend``
    """


class PipelineError(GraphoptError, ValueError):
    """A pipeline string is malformed, or names an unknown pass or option.

    Example: ``unknown pass 'fsue' in pipeline 'fold,fsue'; valid passes: cse, dce, fold, ...``
    """


class PassOptionError(PipelineError):
    """A pass option has the wrong type or is out of range.

    Example: ``prune: option ratio=1.5 is out of range [0, 1)``
    """


class PassError(GraphoptError, RuntimeError):
    """A pass raised while running; names the pass, the passes already run and the pipeline.

    Example: ``pass 'fuse' failed (after fold,dce) in pipeline 'fold,dce,fuse': ...``
    """


class VerificationError(GraphoptError, AssertionError):
    """A pass left the graph numerically different from the original beyond tolerance.

    Example: ``after pass 'fold_batchnorm': max abs error 0.31 exceeds atol=1e-05 + rtol=0.0001``
    """


class GraphInvariantError(GraphoptError, AssertionError):
    """A pass broke a structural invariant of the graph (dangling node, missing meta...).

    Example: ``node 'relu_1' has no shape/dtype meta``
    """


class TargetError(GraphoptError, ValueError):
    """Unknown target name or an invalid target description.

    Example: ``unknown target 'x87'; valid targets: x86, x86-avx2, ...``
    """


class CompilationError(GraphoptError, RuntimeError):
    """The backend failed to build the graph.

    Example: ``TVM build for target x86 failed: ...``
    """


class InputError(GraphoptError, ValueError):
    """Inputs given at run time do not match what the module was compiled for.

    Example: ``input 'x': expected shape (1, 3, 32, 32), got (1, 3, 28, 28)``
    """


class IndexOutOfRangeError(GraphoptError, IndexError):
    """A compiled module was called with an index outside the dim it indexes (a token id past
    the end of an embedding table, a negative id where PyTorch refuses one).

    Example: ``index out of range in aten.embedding.default (node 'embedding', from model.py:9):
    every index into the embedding table's rows (size 10) must lie in [0, size)``
    """


class CalibrationError(InputError):
    """Calibration data does not fit the graph's inputs (tensor count, rank, shape or dtype).

    Example: ``calibration item 3: expected 2 tensors (x, y), got 3``
    """


class ArtifactError(GraphoptError, OSError):
    """An artifact is missing, corrupt, tampered with or was built for something else.

    Example: ``artifact out/: SHA-256 of model.so does not match the manifest (file changed?)``
    """


class ToolchainError(GraphoptError, RuntimeError):
    """A cross-compilation toolchain needed for the target is missing.

    Example: ``aarch64-linux-gnu-g++ not found; install it with: apt-get install -y g++-aarch64-linux-gnu``
    """


class EmulationError(GraphoptError, RuntimeError):
    """Running an artifact under emulation (qemu-user) failed.

    Example: ``emulated run failed (exit 1): ImportError: libpython3.11.so.1.0 not found``
    """


class TuningError(GraphoptError, RuntimeError):
    """Autotuning could not start or its database could not be used.

    Example: ``tuning database tune.db is not a directory of MetaSchedule JSON records``
    """


def _register_with_tvm_ffi() -> None:
    """Errors that compiled code raises by kind name (a TIR assert of kind
    ``IndexOutOfRangeError``) reach Python as graphopt's class, in loaded artifacts too."""
    try:
        import tvm_ffi
    except ImportError:  # no TVM: nothing compiled can raise
        return
    tvm_ffi.register_error(IndexOutOfRangeError.__name__, IndexOutOfRangeError)


_register_with_tvm_ffi()
