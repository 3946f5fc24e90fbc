"""Small per-task tiles live on the stack: no workspace-pool call pair per task of a kernel."""

import re

import torch
from tvm import tirx

import graphopt
from graphopt.targets.cpu.stack_tiles import DISABLE_LOWER_BUILTIN, STACK_TILE_BYTES, _on_stack
from graphopt.testing import assert_matches_eager


def _annotated(buffer) -> bool:
    return DISABLE_LOWER_BUILTIN in _on_stack(tirx.AllocBuffer(buffer)).annotations


def test_a_register_tile_is_kept_on_the_stack_and_a_staging_buffer_is_not():
    assert _annotated(tirx.decl_buffer((8,), "float32x32", scope="local"))  # 1 KiB accumulator tile
    assert _annotated(tirx.decl_buffer((STACK_TILE_BYTES // 4,), "float32", scope="local"))
    assert not _annotated(tirx.decl_buffer((STACK_TILE_BYTES // 4 + 1,), "float32", scope="local"))
    assert not _annotated(tirx.decl_buffer((tirx.Var("n", "int64"), 16), "float32", scope="local"))
    assert not _annotated(tirx.decl_buffer((16,), "float32", scope="shared"))


def _asm(module) -> str:
    texts, stack = [], [module.executable.mod]
    while stack:
        mod = stack.pop()
        if mod.kind == "llvm":
            texts.append(mod.inspect_source("asm"))
        stack.extend(mod.imports)
    return "\n".join(texts)


def test_matmul_tasks_call_no_workspace_allocator_and_match_eager():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64)).eval()
    x = torch.randn(32, 256)
    module = graphopt.compile(model, "x86", (x,))
    # the symbol is declared once per library; a call site loads its address
    loads = re.findall(r"mov\w*\s+__TVMBackendAllocWorkspace@GOTPCREL", _asm(module))
    assert loads == []
    assert_matches_eager(module(x), model, (x,))
