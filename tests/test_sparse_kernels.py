"""Block-sparse and N:M-sparse linear kernels (targets/cpu/schedules/sparse_linear.py,
sparse_nm.py, sparse_format.py).

A constant linear weight whose 1 x lanes or lanes x 1 blocks are mostly exact zeros builds to
the block-sparse kernel, which stores only the kept blocks; a weight with too few zero blocks
keeps the dense kernel and the build log says why. Compiled models are compared with eager on
the fp32 (``algebraic``) rung at 16 lanes (AVX-512, this host), 8 (AVX2, runs here) and 4
(arm64, checked structurally). A 2:4 weight (no all-zero blocks) builds to the N:M kernel
for one input row and keeps the dense kernel, with the reason logged, for more.
"""

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.targets.cpu.schedules.sparse_format import choose, nm_structure, to_bsr, to_nm, zero_block_mask
from graphopt.testing import assert_matches_eager


def zero_blocks(weight: torch.Tensor, block: tuple[int, int], share: float) -> torch.Tensor:
    """``weight`` with the ``share`` of its ``block`` s of smallest magnitude set to zero."""
    r, c = block
    out_f, in_f = weight.shape
    norms = weight.reshape(out_f // r, r, in_f // c, c).abs().sum(dim=(1, 3)).flatten()
    keep = torch.ones_like(norms)
    keep[norms.argsort()[:int(round(share * norms.numel()))]] = 0
    mask = keep.reshape(out_f // r, in_f // c).repeat_interleave(r, 0).repeat_interleave(c, 1)
    return weight * mask


def mlp(block: tuple[int, int] | None, share: float, widths=(128, 64, 32)) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2])).eval()
    if block is not None:
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.weight.copy_(zero_blocks(layer.weight, block, share))
    return model


def kernel_rules(model: nn.Module, x: torch.Tensor, target: str) -> list[str | None]:
    from graphopt.targets.build import fusion_mode, kernel_rules
    from graphopt.targets.frontend.lower import lower_to_relax
    from graphopt.targets.registry import resolve_target

    graph = graphopt.optimize(model, (x,))
    return [rule for _, rule in kernel_rules(lower_to_relax(graph), resolve_target(target), fusion_mode(graph, None))]


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# a zero 4x8 block is four zero 1x8 blocks: coarser pruning is found in the vector layout
@pytest.mark.parametrize("block, layout", [((1, 8), (1, 8)), ((8, 1), (8, 1)), ((4, 8), (1, 8))])
def test_bsr_keeps_exactly_the_nonzero_blocks(block, layout):
    w = zero_blocks(torch.randn(32, 48), block, 0.75).numpy()
    bsr = to_bsr(w, layout)
    assert np.array_equal(bsr.dense(), w)
    assert bsr.kept == int((~zero_block_mask(w, layout)).sum()) and bsr.kept_share == pytest.approx(0.25, abs=0.02)
    assert bsr.nbytes < 0.3 * w.nbytes + 4 * (bsr.kept + 33)


def test_the_layout_with_more_zero_blocks_is_chosen():
    w = zero_blocks(torch.randn(64, 64), (16, 1), 0.9).numpy()
    choice, bsr = choose(w, rows=1, lanes=16)
    assert choice.sparse and choice.block == (16, 1) and bsr.block == (16, 1)
    assert choice.zero_share == pytest.approx(0.9, abs=0.01)


# each target with both layouts, and each layout with one row (a GEMV) and a tile of rows
@pytest.mark.parametrize("target, layout, rows", [("x86", "row", 1), ("x86", "column", 12),
                                                  ("x86-avx2", "row", 12), ("x86-avx2", "column", 1)])
def test_block_sparse_linear_builds_to_the_sparse_kernel_and_matches_eager(target, layout, rows):
    from graphopt.targets.cpu.schedules import vector_isa
    from graphopt.targets.registry import resolve_target

    lanes = vector_isa(resolve_target(target).tvm_target()).lanes()
    block = (1, lanes) if layout == "row" else (lanes, 1)
    model, x = mlp(block, 0.9), torch.randn(rows, 128)
    assert kernel_rules(model, x, target).count("SparseLinear") == 2
    assert_matches_eager(graphopt.compile(model, target, (x,))(x), model, (x,))


def test_sequence_inputs_use_the_sparse_kernel_over_all_their_rows():
    model, x = mlp((1, 16), 0.9), torch.randn(2, 5, 128)
    assert kernel_rules(model, x, "x86").count("SparseLinear") == 2
    assert_matches_eager(graphopt.compile(model, "x86", (x,))(x), model, (x,))


def test_arm64_builds_use_four_lane_blocks(caplog):
    model = mlp((1, 4), 0.9)
    with caplog.at_level(logging.INFO, logger="graphopt.sparse"):
        assert kernel_rules(model, torch.randn(1, 128), "arm64").count("SparseLinear") == 2
    assert "90% of its 1x4 blocks are zero" in caplog.text


@pytest.mark.emulated
def test_sparse_mlp_for_arm64_runs_emulated_like_eager(aarch64_env, tmp_path):
    from graphopt.targets.aarch64 import emulation

    torch.manual_seed(0)  # one layer of each layout: 1x4 blocks, then 4x1
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():
        model[0].weight.copy_(zero_blocks(model[0].weight, (1, 4), 0.9))
        model[2].weight.copy_(zero_blocks(model[2].weight, (4, 1), 0.9))
    x = torch.randn(3, 128)
    assert kernel_rules(model, x, "arm64").count("SparseLinear") == 2
    compiled = graphopt.compile(model, "arm64", (x,))
    (out,) = emulation.run_artifact_emulated(compiled.save(str(tmp_path / "sparse-arm64")), [x.numpy()],
                                             timeout=300, env=aarch64_env)
    assert_matches_eager(torch.as_tensor(out), model, (x,))


def test_a_dense_weight_keeps_the_dense_kernel(caplog):
    model, x = mlp(None, 0.0), torch.randn(1, 128)
    with caplog.at_level(logging.INFO, logger="graphopt.sparse"):
        rules = kernel_rules(model, x, "x86")
    assert "SparseLinear" not in rules and "Matmul" in rules
    assert "graphopt.sparse" not in caplog.text  # nothing to say about a dense weight


def test_a_weight_with_too_few_zero_blocks_falls_back_with_its_reason_logged(caplog):
    model, x = mlp((1, 16), 0.3), torch.randn(1, 128)
    with caplog.at_level(logging.INFO, logger="graphopt.sparse"):
        compiled = graphopt.compile(model, "x86", (x,))
    assert "dense kernel, only 30% of its 1x16 blocks are zero" in caplog.text
    assert "the sparse kernel wins from" in caplog.text
    assert_matches_eager(compiled(x), model, (x,))


def test_the_artifact_stores_only_the_kept_blocks(tmp_path):
    x = torch.randn(1, 256)
    sizes = {}
    for share in (0.0, 0.9):
        model = mlp((1, 16), share, widths=(256, 512, 128))
        sizes[share] = _dir_size(graphopt.compile(model, "x86", (x,)).save(str(tmp_path / f"s{share}")))
    weights = 4 * (256 * 512 + 512 * 128)
    assert sizes[0.0] > weights
    # 10% of the weights stay, plus one int32 column per kept 16-float block
    assert sizes[0.0] - sizes[0.9] > 0.8 * weights, sizes


# --------------------------------------------------------------------------- N:M


def keep_n_of_m(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``weight`` with the ``m - n`` smallest-magnitude inputs of every group of ``m`` set to zero."""
    groups = weight.reshape(weight.shape[0], -1, m)
    smallest = groups.abs().argsort(dim=-1)[..., :m - n]
    return groups.scatter(-1, smallest, 0).reshape(weight.shape)


def nm_mlp(n: int = 2, m: int = 4) -> nn.Module:
    model = mlp(None, 0.0)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(keep_n_of_m(layer.weight, n, m))
    return model


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8)])
def test_nm_packing_keeps_exactly_the_weight(n, m):
    w = keep_n_of_m(torch.randn(32, 64), n, m).numpy()
    w[3, :m] = 0  # a group with fewer than n nonzeros is padded with zeros
    assert nm_structure(w) == (n, m)
    packed = to_nm(w, n, m)
    assert packed.values.shape == (32, 64 * n // m) and packed.positions.dtype == np.uint8
    assert np.array_equal(packed.dense(), w)


def test_a_dense_or_three_of_four_weight_is_not_nm():
    assert nm_structure(torch.randn(16, 64).numpy()) is None
    assert nm_structure(keep_n_of_m(torch.randn(16, 64), 3, 4).numpy()) is None


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])  # 16 and 8 lanes
def test_a_2_of_4_linear_builds_to_the_nm_kernel_and_matches_eager(target, caplog):
    model, x = nm_mlp(), torch.randn(1, 128)
    with caplog.at_level(logging.INFO, logger="graphopt.sparse"):
        assert kernel_rules(model, x, target).count("SparseNMLinear") == 2
    assert "2:4 sparse: N:M-sparse kernel" in caplog.text
    assert_matches_eager(graphopt.compile(model, target, (x,))(x), model, (x,))


def test_a_2_of_8_sequence_of_one_token_uses_the_nm_kernel():
    model, x = nm_mlp(2, 8), torch.randn(1, 1, 128)
    assert kernel_rules(model, x, "x86").count("SparseNMLinear") == 2
    assert_matches_eager(graphopt.compile(model, "x86", (x,))(x), model, (x,))


def test_a_2_of_4_linear_over_several_rows_keeps_the_dense_kernel_with_its_reason(caplog):
    model, x = nm_mlp(), torch.randn(12, 128)
    with caplog.at_level(logging.INFO, logger="graphopt.sparse"):
        compiled = graphopt.compile(model, "x86", (x,))
    assert "linear 128->64 (12 rows), 2:4 sparse: dense kernel; the N:M kernel wins only up to 1 row" in caplog.text
    assert_matches_eager(compiled(x), model, (x,))


def test_the_nm_artifact_stores_the_kept_values_and_a_byte_per_position(tmp_path):
    x = torch.randn(1, 256)
    sizes = {}
    for n_of_4 in (4, 2):
        model = mlp(None, 0.0, widths=(256, 512, 128))
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.weight.copy_(keep_n_of_m(layer.weight, n_of_4, 4))
        sizes[n_of_4] = _dir_size(graphopt.compile(model, "x86", (x,)).save(str(tmp_path / f"nm{n_of_4}")))
    weights = 4 * (256 * 512 + 512 * 128)
    # half the values stay, plus a byte per kept value: 5/8 of the weights' bytes
    assert sizes[4] - sizes[2] > 0.3 * weights, sizes
