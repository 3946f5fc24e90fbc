"""aarch64 without a board: retired guest instructions per inference, graphopt against ONNX Runtime, under qemu.

    python benchmarks/arm_instructions.py [--models mlp,cnn,resnet18,mobilenet_v2,transformer] [--runs 2]
        [--variants graphopt-fp32,ort-fp32,graphopt-int8,ort-int8] [--cpu neoverse-n1]
        [--profile resnet18:graphopt-fp32]

For each reference model (batch 1) it builds graphopt's ``arm64`` artifact (fp32, default pipeline) and its
``arm64-dotprod`` artifact (``fold,quantize{mode=int8},fuse``), exports the same model to ONNX (fp32, and ORT's
static per-channel int8 QDQ model calibrated on the same samples), and runs each alone in a fresh emulated
aarch64 CPython: the sysroot graphopt's emulated tests use, with ONNX Runtime's own aarch64 wheel beside
TVM's runtime. Every runtime gets one thread (``TVM_NUM_THREADS=1``; ORT intra- and inter-op pools of 1).

Why instructions: wall time under qemu measures the emulator (its NEON helpers, its translation cache), not
the code. The count of guest instructions the program retires does measure the code, the way a real board's
``instructions`` counter would, though not its cycles: a 4-lane ``fmla`` and a scalar ``add`` both count one,
and cache misses are free. So the count ranks how much work each runtime does, not how fast a given core
runs it.

How it counts: a small TCG plugin (``INSN_PLUGIN_SOURCE``, compiled here with the ``ziglang`` wheel's C
compiler against qemu's stable plugin API, version 1) adds each translated block's instruction count to a
counter every time the block runs (what qemu's ``contrib/plugins``/``tests/plugin/bb.c`` inline mode does;
Debian's ``qemu-user`` has plugin support but ships no plugins). The guest marks points in its run with a
system call nobody makes otherwise, ``lseek(-1, MAGIC << 16 | tag)`` (it fails with EBADF), and the plugin
prints the counter at each mark. The guest runs warm-up inferences, then marks before and after each
measured one: per-inference counts exclude interpreter start, imports, model loading and the first run's
one-time work. The cost of a mark itself (the failing system call and its Python exception) is measured
between two back-to-back marks and subtracted. Counting is exact to the block: a block left by an exception
part-way counts whole, which only the mark's own system call does here. With ``--profile MODEL:VARIANT``
the plugin also counts each block, and the blocks are attributed to the ELF symbols of the libraries the
guest had mapped (its ``/proc/self/maps``), giving instructions per kernel.

Two host-side adjustments keep the product untouched: the benchmark's sysroot (under
``~/.cache/graphopt/bench-arm``) is a folder of links to graphopt's cached one plus a ``proc/cpuinfo`` that
describes the emulated CPU (qemu 7.2 shows the guest the host's x86 ``/proc/cpuinfo``, and ORT's cpuinfo
library dereferences a null processor list on it; qemu resolves absolute paths inside ``-L`` first), and
ORT's wheel is unpacked into a benchmark-only site folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import host_banner, table  # noqa: E402

MARKER_MAGIC = 0x6F707467
TAG_BEGIN, TAG_END, TAG_STEP, TAG_EMPTY = 1, 2, 3, 4
ORT_VERSION = "1.32.0"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
INT8_PIPELINE = "fold,quantize{mode=int8},fuse"
VARIANTS = ("graphopt-fp32", "ort-fp32", "graphopt-int8", "ort-int8")
CALIBRATION_SAMPLES = 8

#: /proc/cpuinfo of the emulated CPU, per qemu ``-cpu`` model (what an arm64 Linux kernel prints for one).
CPUINFO = {
    "neoverse-n1": ("0x3", "0xd0c", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                    "asimdrdm lrcpc dcpop asimddp ssbs"),
    "cortex-a76": ("0x4", "0xd0b", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                   "asimdrdm lrcpc dcpop asimddp"),
}

INSN_PLUGIN_SOURCE = r"""
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The few declarations of qemu's plugin API (include/qemu/qemu-plugin.h, QEMU_PLUGIN_VERSION 1) used here. */
typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*syscall_cb)(qemu_plugin_id_t, unsigned, int64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                           uint64_t, uint64_t, uint64_t, uint64_t);
typedef void (*vcpu_cb)(qemu_plugin_id_t, unsigned);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_trans_cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, enum qemu_plugin_op, void *, uint64_t);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t, syscall_cb);
void qemu_plugin_register_vcpu_init_cb(qemu_plugin_id_t, vcpu_cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);
void qemu_plugin_outs(const char *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define SYS_LSEEK_AARCH64 62
#define MARKER_MAGIC 0x%(magic)xULL

static uint64_t insns;   /* guest instructions retired; inline adds are not atomic: one guest thread runs */
static unsigned vcpus;   /* guest threads started */
static int profile;      /* count every block as well */
struct block { uint64_t vaddr, n_insns, execs; };
static struct block **blocks;
static size_t n_blocks, cap_blocks;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, n);
    if (!profile) return;
    struct block *b = calloc(1, sizeof *b);
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->n_insns = n;
    pthread_mutex_lock(&lock);
    if (n_blocks == cap_blocks) {
        cap_blocks = cap_blocks ? 2 * cap_blocks : 65536;
        blocks = realloc(blocks, cap_blocks * sizeof *blocks);
    }
    blocks[n_blocks++] = b;
    pthread_mutex_unlock(&lock);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->execs, 1);
}

static void on_vcpu_init(qemu_plugin_id_t id, unsigned index) { __atomic_add_fetch(&vcpus, 1, __ATOMIC_RELAXED); }

/* A mark is lseek(-1, MARKER_MAGIC << 16 | tag, 0) from the guest. */
static void on_syscall(qemu_plugin_id_t id, unsigned vcpu, int64_t num, uint64_t a1, uint64_t a2, uint64_t a3,
                       uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8) {
    if (num != SYS_LSEEK_AARCH64 || (uint32_t)a1 != 0xffffffffu || (a2 >> 16) != MARKER_MAGIC) return;
    unsigned tag = (unsigned)(a2 & 0xffff);
    char line[128];
    snprintf(line, sizeof line, "insn-mark %%u %%" PRIu64 " %%u\n", tag, insns, vcpus);
    qemu_plugin_outs(line);
    if (!profile) return;
    pthread_mutex_lock(&lock);
    if (tag == %(begin)d) {
        for (size_t i = 0; i < n_blocks; i++) blocks[i]->execs = 0;
    } else if (tag == %(end)d) {
        for (size_t i = 0; i < n_blocks; i++) {
            if (!blocks[i]->execs) continue;
            snprintf(line, sizeof line, "insn-block %%" PRIx64 " %%" PRIu64 " %%" PRIu64 "\n", blocks[i]->vaddr,
                     blocks[i]->n_insns, blocks[i]->execs);
            qemu_plugin_outs(line);
        }
    }
    pthread_mutex_unlock(&lock);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv) {
    for (int i = 0; i < argc; i++) profile |= strcmp(argv[i], "profile=on") == 0;
    qemu_plugin_register_vcpu_init_cb(id, on_vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    return 0;
}
""" % {"magic": MARKER_MAGIC, "begin": TAG_BEGIN, "end": TAG_END}

#: Runs in the emulated aarch64 CPython: numpy, TVM's runtime and onnxruntime only.
GUEST_SCRIPT = r"""
import json, os, sys

MAGIC, TAG_BEGIN, TAG_END, TAG_STEP, TAG_EMPTY = %(magic)d, %(begin)d, %(end)d, %(step)d, %(empty)d


def mark(tag):
    try:
        os.lseek(-1, (MAGIC << 16) | tag, 0)
    except OSError:
        pass


def graphopt_runner(folder, x):
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import tvm
    from tvm.runtime.vm import VirtualMachine

    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    vm = VirtualMachine(tvm.runtime.load_module(os.path.join(folder, manifest.get("library", "model.so"))),
                        tvm.cpu())
    entry, arg = vm[manifest.get("entry", "main")], tvm.runtime.tensor(x)

    def fetch(value):
        return value.numpy() if hasattr(value, "numpy") else [fetch(v) for v in value]

    return lambda: fetch(entry(arg))


def ort_runner(path, x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)


def thread_ticks():
    # qemu-user runs each guest thread as a host thread of its own process: the host's per-thread CPU time
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks


def main(kind, model, inputs, warmup, runs, maps_out):
    import numpy as np

    x = np.ascontiguousarray(np.load(inputs))
    infer = (graphopt_runner if kind == "graphopt" else ort_runner)(model, x)
    for _ in range(int(warmup)):
        infer()
    mark(TAG_EMPTY)
    mark(TAG_EMPTY)
    before = thread_ticks()
    mark(TAG_BEGIN)
    for i in range(int(runs)):
        infer()
        mark(TAG_STEP if i + 1 < int(runs) else TAG_END)
    after = thread_ticks()
    used = {tid: after[tid] - before.get(tid, 0) for tid in after}
    main_thread = str(os.getpid())
    print("@thread-ticks " + json.dumps({"main": used.pop(main_thread, 0), "others": sum(used.values())}))
    if maps_out != "-":
        with open("/proc/self/maps") as src, open(maps_out, "w") as dst:
            dst.write(src.read())


main(*sys.argv[1:])
""" % {"magic": MARKER_MAGIC, "begin": TAG_BEGIN, "end": TAG_END, "step": TAG_STEP, "empty": TAG_EMPTY}


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- the environment


@dataclass(frozen=True)
class CountingEnv:
    """graphopt's emulated aarch64 Python, with ORT's wheel, a cpuinfo and the counting plugin beside it."""

    root: Path
    product_site: Path
    qemu: str
    cpu: str

    @property
    def sysroot(self) -> Path:
        return self.root / f"sysroot-{self.cpu}"

    @property
    def ort_site(self) -> Path:
        return self.root / f"site-onnxruntime-{ORT_VERSION}"

    @property
    def plugin(self) -> Path:
        return self.root / "libinsn_count.so"

    def qemu_version(self) -> str:
        out = subprocess.run([self.qemu, "--version"], capture_output=True, text=True, check=False).stdout
        return out.splitlines()[0] if out else "unknown"

    def run(self, args: list[str], log: Path, profile: bool, timeout: float) -> subprocess.CompletedProcess[str]:
        plugin = f"{self.plugin}" + (",profile=on" if profile else "")
        cmd = [self.qemu, "-cpu", self.cpu, "-L", str(self.sysroot), "-plugin", plugin, "-d", "plugin",
               "-D", str(log), str(self.sysroot / "usr" / "bin" / "python3.11"), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        env.update(PYTHONPATH=f"{self.product_site}:{self.ort_site}", PYTHONNOUSERSITE="1", TVM_NUM_THREADS="1",
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0")
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def counting_env(cpu: str) -> CountingEnv:
    from graphopt.targets.aarch64.emulation import ensure_aarch64_sysroot

    product = ensure_aarch64_sysroot()
    root = product.root.parent.parent / "bench-arm"
    env = CountingEnv(root=root, product_site=product.site, qemu=product.qemu, cpu=cpu)
    root.mkdir(parents=True, exist_ok=True)
    if not env.sysroot.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=root))
        for entry in product.sysroot.iterdir():
            (tmp / entry.name).symlink_to(entry)
        (tmp / "proc").mkdir()
        variant, part, features = CPUINFO[cpu]
        cores = len(os.sched_getaffinity(0))  # /sys/devices/system/cpu/possible is the host's
        (tmp / "proc" / "cpuinfo").write_text("".join(
            f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
            f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n\n"
            for i in range(cores)))
        tmp.rename(env.sysroot)
    if not env.ort_site.is_dir():
        wheels = root / "wheels"
        _progress(f"fetching onnxruntime=={ORT_VERSION} ({WHEEL_PLATFORM}) for the emulated Python")
        subprocess.run([sys.executable, "-m", "pip", "download", f"onnxruntime=={ORT_VERSION}", "--no-deps",
                        "--only-binary=:all:", "--platform", WHEEL_PLATFORM, "--python-version", "3.11",
                        "--disable-pip-version-check", "-d", str(wheels)], check=True, capture_output=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        (wheel,) = wheels.glob(f"onnxruntime-{ORT_VERSION}-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        tmp.rename(env.ort_site)
    if not env.plugin.is_file():
        source = root / "insn_count.c"
        source.write_text(INSN_PLUGIN_SOURCE, encoding="utf-8")
        subprocess.run([sys.executable, "-m", "ziglang", "cc", "-shared", "-fPIC", "-O2", "-fvisibility=hidden",
                        "-o", str(env.plugin), str(source)], check=True)
    return env


# --------------------------------------------------------------------------------------------- the models


def build_variants(name: str, variants: list[str], folder: Path) -> tuple[dict[str, Path], np.ndarray]:
    """The model's artifacts and ONNX files, built once per folder (the folder name carries the commit)."""
    import graphopt
    from graphopt.models import REFERENCE_MODELS

    ref = REFERENCE_MODELS[name]
    model, x = ref.build().eval(), ref.example_input()
    calibration = [ref.example_input(seed=s) for s in range(100, 100 + CALIBRATION_SAMPLES)]
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for variant in variants:
        path = folder / (variant + (".onnx" if variant.startswith("ort") else ""))
        paths[variant] = path
        if path.exists():
            continue
        started = time.perf_counter()
        if variant == "graphopt-fp32":
            graphopt.compile(model, "arm64", (x,)).save(str(path))
        elif variant == "graphopt-int8":
            graphopt.compile(model, "arm64-dotprod", (x,), INT8_PIPELINE,
                             calibration_data=[(c,) for c in calibration]).save(str(path))
        elif variant == "ort-fp32":
            _export_onnx(model, x, path)
        else:
            _quantize_onnx(model, x, calibration, folder, path)
        _progress(f"{name}: built {variant} in {time.perf_counter() - started:.0f} s")
    return paths, x.numpy()


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    # as benchmarks/peers.py: the TorchScript exporter, one self-contained file
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], external_data=False,
                      dynamo=False)


def _quantize_onnx(model: torch.nn.Module, x: torch.Tensor, calibration: list[torch.Tensor], folder: Path,
                   path: Path) -> None:
    """ORT's static int8 QDQ model (per-channel weights, s8 activations), as benchmarks/bench_quantize.py."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre = folder / "ort-int8-source.onnx", folder / "ort-int8-pre.onnx"
    _export_onnx(model, x, fp32)
    try:
        quant_pre_process(str(fp32), str(pre))
    except AssertionError:  # ORT's symbolic shape inference gives up on some reshapes (the transformer)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)

    class Samples(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter([{"x": c.numpy()} for c in calibration])

        def get_next(self) -> dict | None:
            return next(self.samples, None)

    quantize_static(str(pre), str(path), Samples(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


# ------------------------------------------------------------------------------------------------ counting


@dataclass
class Count:
    per_inference: list[int]   # instructions of each measured inference, the marks' own cost subtracted
    mark_cost: int
    threads: int
    #: CPU time (clock ticks) of the main thread and of all others during the measured inferences: the counter
    #: is shared, so the others must stay idle for the count to be the inference's.
    main_ticks: int
    other_ticks: int
    wall_s: float
    blocks: list[tuple[int, int, int]] | None = None   # (vaddr, instructions, executions), with --profile
    maps: str | None = None


def count(env: CountingEnv, kind: str, model: Path, x: np.ndarray, scratch: Path, warmup: int, runs: int,
          profile: bool = False, timeout: float = 7200.0) -> Count:
    script, inputs = scratch / "guest.py", scratch / "input.npy"
    log, maps = scratch / "plugin.log", scratch / "maps.txt"
    script.write_text(GUEST_SCRIPT, encoding="utf-8")
    np.save(inputs, x)
    log.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = env.run([str(script), kind, str(model), str(inputs), str(warmup), str(runs),
                    str(maps) if profile else "-"], log, profile, timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"emulated {kind} run of {model} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ticks = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("@thread")]
    marks, blocks = [], []
    for line in log.read_text().splitlines():
        fields = line.split()
        if fields[:1] == ["insn-mark"]:
            marks.append((int(fields[1]), int(fields[2]), int(fields[3])))
        elif fields[:1] == ["insn-block"]:
            blocks.append((int(fields[1], 16), int(fields[2]), int(fields[3])))
    tags = [m[0] for m in marks]
    expected = [TAG_EMPTY, TAG_EMPTY, TAG_BEGIN] + [TAG_STEP] * (runs - 1) + [TAG_END]
    if tags != expected:
        raise RuntimeError(f"marks {tags} in {log}, expected {expected}")
    mark_cost = marks[1][1] - marks[0][1]
    counters = [m[1] for m in marks[2:]]
    per_inference = [b - a - mark_cost for a, b in zip(counters, counters[1:])]
    return Count(per_inference, mark_cost, max(m[2] for m in marks), ticks[0]["main"], ticks[0]["others"], wall,
                 blocks or None, maps.read_text() if profile else None)


# --------------------------------------------------------------------------------------------- profiling


def _elf_functions(path: str) -> list[tuple[int, int, str]]:
    """(address, size, name) of the function symbols of an ELF64 little-endian file (.symtab and .dynsym)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    functions = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            name_at, info, _, shndx, value, sym_size = struct.unpack_from("<IBBHQQ", data, pos)
            if info & 0xF != 2 or shndx == 0 or value == 0:  # STT_FUNC, defined
                continue
            end = data.index(b"\0", strtab + name_at)
            functions[value] = (value, sym_size, data[strtab + name_at:end].decode(errors="replace"))
    return sorted(functions.values())


def attribute(blocks: list[tuple[int, int, int]], maps: str, runs: int) -> list[tuple[str, str, float]]:
    """Instructions per inference of each (library, function), most first."""
    regions = []
    bases: dict[str, int] = {}
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        start, end = (int(v, 16) for v in fields[0].split("-"))
        offset, path = int(fields[2], 16), fields[5]
        regions.append((start, end, path))
        if offset == 0:
            bases[path] = min(bases.get(path, start), start)
    regions.sort()
    starts = [r[0] for r in regions]
    symbols: dict[str, tuple[list[int], list[tuple[int, int, str]]]] = {}
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for vaddr, n_insns, execs in blocks:
        i = bisect_right(starts, vaddr) - 1
        if i < 0 or vaddr >= regions[i][1]:
            totals[("[anonymous]", "?")] += n_insns * execs
            continue
        path = regions[i][2]
        if path not in symbols:
            functions = _elf_functions(path)
            symbols[path] = ([f[0] for f in functions], functions)
        addresses, functions = symbols[path]
        address = vaddr - bases.get(path, 0)
        j = bisect_right(addresses, address) - 1
        # TVM's parallel-loop bodies follow their kernel without a symbol of their own: past a symbol's size
        # the block is "after" it, as objdump's listing shows it
        name = "?" if j < 0 else functions[j][2] + ("" if address < functions[j][0] + functions[j][1] else "+")
        totals[(os.path.basename(path), name)] += n_insns * execs
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return [(lib, fn, total / runs) for (lib, fn), total in ranked]


# ---------------------------------------------------------------------------------------------------- main


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,cnn,resnet18,mobilenet_v2,transformer")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--runs", type=int, default=2, help="measured inferences per runtime (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cpu", default="neoverse-n1", choices=sorted(CPUINFO), help="qemu -cpu model")
    p.add_argument("--profile", default="", help="MODEL:VARIANT[,...]: also count instructions per function")
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    p.add_argument("--results", default="", help="append one JSON line per measurement to this file")
    p.add_argument("--workdir", default="", help="where models are built (default: the cache, per commit)")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    profiles = {tuple(item.split(":", 1)) for item in args.profile.split(",") if item}

    env = counting_env(args.cpu)
    commit = _commit()
    workdir = Path(args.workdir) if args.workdir else env.root / "models" / commit
    header = (f"{host_banner('arm64')}\nemulated: {env.qemu_version()}, -cpu {args.cpu}; commit {commit}; "
              f"1 thread per runtime; onnxruntime {ORT_VERSION} ({WHEEL_PLATFORM} wheel); "
              f"median of {args.runs} inferences after {args.warmup} warm-up")
    print(header, flush=True)
    rows = []
    for name in args.models.split(","):
        paths, x = build_variants(name, variants, workdir / name)
        medians: dict[str, float] = {}
        for variant in variants:
            kind = variant.split("-")[0]
            profile = (name, variant) in profiles
            with tempfile.TemporaryDirectory(prefix="arm-insn-") as scratch:
                result = count(env, kind, paths[variant], x, Path(scratch), args.warmup, args.runs, profile)
            medians[variant] = float(np.median(result.per_inference))
            _progress(f"{name} {variant}: {medians[variant] / 1e6:.2f} M instructions per inference "
                      f"(runs {result.per_inference}, mark {result.mark_cost}, threads {result.threads}, "
                      f"CPU ticks main/others {result.main_ticks}/{result.other_ticks}, "
                      f"{result.wall_s:.0f} s emulated)")
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps({"model": name, "variant": variant, "per_inference": result.per_inference,
                                        "mark_cost": result.mark_cost, "threads": result.threads,
                                        "ticks_main_others": [result.main_ticks, result.other_ticks],
                                        "wall_s": round(result.wall_s, 1), "cpu": args.cpu, "commit": commit,
                                        "qemu": env.qemu_version()}) + "\n")
            if result.blocks is not None and result.maps is not None:
                ranked = attribute(result.blocks, result.maps, args.runs)
                total = sum(r[2] for r in ranked)
                print(f"\nprofile {name} {variant}: {total / 1e6:.2f} M instructions per inference", flush=True)
                print(table(["library", "function", "M instr/inference", "%"],
                            [(lib, re.sub(r"\|", "/", fn)[:80], f"{n / 1e6:.3f}", f"{100 * n / total:.1f}")
                             for lib, fn, n in ranked[:args.top]]), flush=True)
        rows.append((name, medians))

    def cell(medians: dict[str, float], variant: str) -> str:
        return f"{medians[variant] / 1e6:.2f}" if variant in medians else "-"

    def ratio(medians: dict[str, float], a: str, b: str) -> str:
        return f"{medians[a] / medians[b]:.2f}" if a in medians and b in medians else "-"

    print("\n" + header)
    print(table(["model", "graphopt fp32 (M instr)", "ORT fp32", "graphopt/ORT", "graphopt int8 (dotprod)",
                 "int8/fp32", "ORT int8 QDQ"],
                [(name, cell(m, "graphopt-fp32"), cell(m, "ort-fp32"), ratio(m, "graphopt-fp32", "ort-fp32"),
                  cell(m, "graphopt-int8"), ratio(m, "graphopt-int8", "graphopt-fp32"), cell(m, "ort-int8"))
                 for name, m in rows]))


if __name__ == "__main__":
    main()
