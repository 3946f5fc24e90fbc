"""Compiled kernels run their parallel loops on PyTorch's OpenMP threads.

TVM's kernels start every parallel loop with ``TVMBackendParallelLaunch``, reached through a
function pointer each kernel library holds (``__TVMBackendParallelLaunch``); tvm-ffi fills it
from its registry of context symbols when it loads a library or JIT-compiles a module. By
default that is TVM's own thread pool. In a process that also runs torch ops, torch's OpenMP
workers spin on the cores for a while after every torch op, and TVM's workers spin after
every kernel: each pool steals the cores the other one needs. mobilenet_v2 (1.8 ms alone)
took 10-12 ms a call between torch ops on a 2-core machine.

So graphopt registers its own launcher under those names: a few lines of C that run the
parallel loop as an OpenMP parallel region of *the OpenMP runtime torch itself uses*
(``GOMP_parallel``, looked up through libtorch_cpu's own dependencies: libgomp in the Linux
wheels; Intel's and LLVM's runtimes export the same entry points). The team that just ran
torch's op runs the kernel, no other thread competes for the cores, and OpenMP's rules apply:
a kernel called inside a parallel region runs on the calling thread (nested regions are
inactive), and each Python thread that calls a module leads its own team. The team has as
many threads as TVM would have used (``TVM_NUM_THREADS``, set by
``artifact.configure_tvm_threads``). A kernel's error on any thread is raised on the caller,
as with TVM's pool.

It is opt-in (``GRAPHOPT_SHARE_TORCH_THREADS=1``) because it also inherits OpenMP's weakness:
at the end of every region the calling thread spins in OpenMP's barrier instead of yielding
(TVM's pool yields). On a machine where other processes keep the cores busy, a descheduled
team thread then costs each region a scheduler time slice: mobilenet_v2 next to ~20 runnable
threads on 2 cores took 0.34-1.2 s a call on torch's threads against 0.036-0.076 s on TVM's
pool (eager PyTorch, on the same OpenMP runtime: 2.4-5.7 s).

The launcher is compiled once with a C compiler (``$CC``, else ``cc``, else Zig's from the
``ziglang`` wheel) into ``$XDG_CACHE_HOME/graphopt/threads`` (``~/.cache/...``). Without a
compiler or without torch's OpenMP runtime, kernels keep TVM's pool. Only libraries loaded
after :func:`share_torch_threads` ran use the launcher: graphopt calls it before it builds or
loads a module.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading

log = logging.getLogger(__name__)

ENV_SWITCH = "GRAPHOPT_SHARE_TORCH_THREADS"

# TVMFFIErrorMoveFromRaised/SetRaised keep a kernel's error per thread: an error raised on a
# worker is moved to the region's first-error slot and raised again on the calling thread.
LAUNCHER_SOURCE = r"""
#include <stdint.h>

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

static void (*gomp_parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
static void (*gomp_barrier)(void);
static int (*omp_get_thread_num)(void);
static int (*omp_get_num_threads)(void);
static void (*error_move_from_raised)(void** error);
static void (*error_set_raised)(void* error);
static int (*object_dec_ref)(void* object);
static int num_threads = 1;
long graphopt_launches = 0;

int graphopt_launcher_init(void* parallel, void* barrier, void* thread_num, void* team_size,
                           void* move_error, void* set_error, void* dec_ref, int threads) {
  gomp_parallel = parallel; gomp_barrier = barrier;
  omp_get_thread_num = thread_num; omp_get_num_threads = team_size;
  error_move_from_raised = move_error; error_set_raised = set_error; object_dec_ref = dec_ref;
  num_threads = threads > 0 ? threads : 1;
  return 0;
}

typedef struct {
  FTVMParallelLambda flambda;
  void* cdata;
  int num_task;
  int failed;
  void* error;  /* the first task error, owned */
} Region;

static void run_tasks(void* data) {
  Region* r = data;
  int team = omp_get_num_threads();
  TVMParallelGroupEnv env = {0, r->num_task};
  /* a smaller team than asked for (a nested region gets one thread) runs every task still */
  for (int task = omp_get_thread_num(); task < r->num_task; task += team) {
    if (r->flambda(task, &env, r->cdata) != 0) {
      void* error = 0;
      __atomic_store_n(&r->failed, 1, __ATOMIC_RELAXED);
      error_move_from_raised(&error);
      if (error && !__sync_bool_compare_and_swap(&r->error, (void*)0, error)) object_dec_ref(error);
    }
  }
}

int graphopt_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  Region r = {flambda, cdata, num_task > 0 ? num_task : num_threads, 0, 0};
  __atomic_fetch_add(&graphopt_launches, 1, __ATOMIC_RELAXED);
  if (r.num_task == 1) {
    TVMParallelGroupEnv env = {0, 1};
    return flambda(0, &env, cdata);
  }
  gomp_parallel(run_tasks, &r, (unsigned)r.num_task, 0);
  if (r.error) {
    error_set_raised(r.error);
    object_dec_ref(r.error);
  }
  return r.failed ? -1 : 0;
}

/* the team's barrier: right where the team has one thread per task, as every region started above
   has unless OpenMP gave it fewer threads (a nested region) */
int graphopt_parallel_barrier(int task_id, TVMParallelGroupEnv* penv) {
  (void)task_id; (void)penv;
  gomp_barrier();
  return 0;
}
"""

_lock = threading.Lock()
_launcher: ctypes.CDLL | None = None
_decided = False


def share_torch_threads() -> bool:
    """With ``GRAPHOPT_SHARE_TORCH_THREADS=1``, route the parallel loops of every kernel library
    loaded from now on through torch's OpenMP runtime; True when they are (decided on the first
    call, for the whole process)."""
    global _decided, _launcher
    with _lock:
        if not _decided:
            _decided = True
            if os.environ.get(ENV_SWITCH, "0") == "1":
                _launcher = _install()
        return _launcher is not None


def sharing() -> bool:
    """Whether kernels loaded from now on run on torch's OpenMP threads."""
    return _launcher is not None


def launches() -> int:
    """Parallel loops started through torch's OpenMP runtime in this process so far."""
    return ctypes.c_long.in_dll(_launcher, "graphopt_launches").value if _launcher is not None else 0


def _install() -> ctypes.CDLL | None:
    openmp = _torch_openmp_runtime()
    if openmp is None:
        log.debug("torch's OpenMP runtime not found: kernels keep TVM's thread pool")
        return None
    launcher = _compiled_launcher()
    if launcher is None:
        return None
    # TVM's runtime registers its own pool's entry points when it is loaded: after that, so ours win
    import tvm  # noqa: F401
    import tvm_ffi

    ffi = ctypes.CDLL(os.path.join(os.path.dirname(tvm_ffi.__file__), "lib", "libtvm_ffi.so"))
    address = lambda lib, name: ctypes.cast(getattr(lib, name), ctypes.c_void_p)  # noqa: E731
    launcher.graphopt_launcher_init(
        address(openmp, "GOMP_parallel"), address(openmp, "GOMP_barrier"), address(openmp, "omp_get_thread_num"),
        address(openmp, "omp_get_num_threads"), address(ffi, "TVMFFIErrorMoveFromRaised"),
        address(ffi, "TVMFFIErrorSetRaised"), address(ffi, "TVMFFIObjectDecRef"),
        int(os.environ.get("TVM_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1))
    # tvm-ffi fills a library's context symbols in registration order: the last one wins
    register = ffi.TVMFFIEnvModRegisterContextSymbol
    register.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    for name, symbol in (("__TVMBackendParallelLaunch", "graphopt_parallel_launch"),
                         ("__TVMBackendParallelBarrier", "graphopt_parallel_barrier")):
        if register(name.encode(), address(launcher, symbol)) != 0:
            log.warning("tvm-ffi refused the context symbol %s: kernels keep TVM's thread pool", name)
            return None
    return launcher


def _torch_openmp_runtime() -> ctypes.CDLL | None:
    """libtorch_cpu's handle: dlsym through it finds the OpenMP entry points torch's own ops
    call (its dependencies are searched in load order), not another copy in the process."""
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        for name in ("GOMP_parallel", "GOMP_barrier", "omp_get_thread_num", "omp_get_num_threads"):
            getattr(lib, name)
    except (OSError, AttributeError):
        return None
    return lib


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "graphopt", "threads")


def _compilers() -> list[tuple[str, ...]]:
    """``$CC``, else the system's ``cc``, then Zig's C driver (the ``ziglang`` wheel, a dependency)."""
    from graphopt.targets.aarch64.toolchain import find_zig

    found = [tuple(os.environ["CC"].split())] if os.environ.get("CC") else []
    if not found and shutil.which("cc"):
        found.append(("cc",))
    zig = find_zig()
    return found + ([zig] if zig else [])


def _compiled_launcher() -> ctypes.CDLL | None:
    """The launcher library, compiled on first use and kept under the user's cache, keyed by
    its source: a changed source never loads a stale library."""
    key = hashlib.sha256(LAUNCHER_SOURCE.encode()).hexdigest()[:16]
    folder = _cache_dir()
    lib = os.path.join(folder, f"launcher-{key}.so")
    if not os.path.exists(lib):
        errors = []
        for compiler in _compilers():
            try:
                os.makedirs(folder, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    src, out = os.path.join(tmp, "launcher.c"), os.path.join(tmp, "launcher.so")
                    with open(src, "w") as f:
                        f.write(LAUNCHER_SOURCE)
                    subprocess.run([*compiler, "-O2", "-shared", "-fPIC", "-o", out, src], check=True,
                                   capture_output=True, timeout=120)
                    os.replace(out, lib)  # atomic: a concurrent process loads a whole library or builds its own
                break
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{' '.join(compiler)}: {e}")
        else:
            log.info("cannot compile graphopt's OpenMP launcher (%s): kernels keep TVM's thread pool",
                     "; ".join(errors) or "no C compiler")
            return None
    try:
        return ctypes.CDLL(lib)
    except OSError as e:
        log.info("cannot load %s (%s): kernels keep TVM's thread pool", lib, e)
        return None
