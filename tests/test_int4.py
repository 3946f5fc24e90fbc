"""``quantize{mode=int4}``: packed int4 weights with per-group scales, run eagerly and compiled.

The graph's ``graphopt::linear_int4`` op is the reference (it dequantizes and calls linear);
the compiled kernel, which unpacks inside its reduction, must match it on the fp32
(``algebraic``) rung; the int4 graph itself is judged against the float model by SQNR and,
on real data, by accuracy.
"""

import os

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import PipelineError
from graphopt.models import accuracy, digits_cnn, digits_mlp, load_digits_split, train_digits
from graphopt.passes.quantize.int4 import LINEAR_INT4, dequantize_int4, pack_int4, quantize_int4, unpack_int4
from graphopt.testing import assert_close, sqnr_db


def _linear_int4_nodes(graph):
    return [n for n in graph.call_nodes() if n.target is LINEAR_INT4]


def _int4(model, x, group=128):
    return graphopt.optimize(model, (x,), f"fold,quantize{{mode=int4,group={group}}}")


def _dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("in_features", [64, 67])
def test_packing_round_trips_every_int4_value(in_features):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, in_features), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (in_features + 1) // 2)
    assert torch.equal(unpack_int4(packed, in_features), q)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_weights_quantize_within_half_a_step_of_their_group_scale(group):
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(1))
    q, scales = quantize_int4(w, group)
    assert scales.shape == (16, -(-200 // group))
    assert int(q.abs().max()) <= 7
    step = scales.repeat_interleave(group, dim=1)[:, :200]
    assert bool(((dequantize_int4(pack_int4(q), scales, group, 200) - w).abs() <= step / 2 + 1e-7).all())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_graph_is_linear_of_the_dequantized_weight(group, bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 40, bias=bias).eval()
    x = torch.randn(3, 96)
    graph = _int4(layer, x, group)
    (node,) = _linear_int4_nodes(graph)
    assert graph.constant(node.args[1]).dtype == torch.uint8 and graph.constant(node.args[1]).shape == (40, 48)
    q, scales = quantize_int4(layer.weight.detach(), group)
    reference = q.float() * scales.repeat_interleave(group, dim=1)[:, :96]
    expected = nn.functional.linear(x, reference, layer.bias)
    assert_close(graph(x), expected, "algebraic")
    assert sqnr_db(layer(x).detach(), graph(x)[0]) > 15.0


def test_mm_by_a_constant_weight_becomes_int4_linear():
    class MatmulByWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 32))

        def forward(self, x):
            return x @ self.w

    torch.manual_seed(0)
    model, x = MatmulByWeight().eval(), torch.randn(2, 64)
    graph = _int4(model, x, 32)
    assert len(_linear_int4_nodes(graph)) == 1
    assert sqnr_db(model(x).detach(), graph(x)[0]) > 15.0


class SqueezeHead(nn.Module):
    """A 3x3 conv, then squeeze-excitation style 1x1 convs over the pooled 1x1 image."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 64, 3, padding=1)
        self.pointwise = nn.Conv2d(64, 64, 1)  # over 8x8 pixels: a GEMM, stays float
        self.squeeze = nn.Conv2d(64, 96, 1)
        self.classifier = nn.Conv2d(96, 10, 1, bias=False)

    def forward(self, x):
        x = self.pointwise(torch.relu(self.features(x)))
        x = torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))
        return self.classifier(x).flatten(1)


def test_1x1_convs_over_a_1x1_image_become_int4_linears_and_other_convs_say_why_they_stay_float():
    torch.manual_seed(0)
    model, x = SqueezeHead().eval(), torch.randn(2, 3, 8, 8)
    graph = _int4(model, x, group=32)
    assert len(_linear_int4_nodes(graph)) == 2
    report = graph.annotations["quantize"]
    assert report["quantized"] == ["squeeze", "classifier"] and report["float"] == ["features", "pointwise"]
    reasons = {r["layer"]: r["reason"] for r in report["float_why"]}
    assert "k x k" in reasons["features"] and "8x8 pixels" in reasons["pointwise"]
    assert sqnr_db(model(x).detach(), graph(x)[0]) > 15.0
    compiled = graphopt.compile(graph, "x86", (x,), pipeline="fuse")
    assert_close(compiled(x), graph(x)[0], "algebraic")


@pytest.mark.parametrize("group,in_features", [(32, 96), (128, 67)])
def test_int4_gradient_reaches_input_scales_and_bias_like_the_dequantized_linear(group, in_features):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, in_features, generator=g), torch.randn(2, 3, in_features, generator=g)
    bias, grad = torch.randn(24, generator=g), torch.randn(2, 3, 24, generator=g)
    q, scales = quantize_int4(w, group)
    ours = [t.clone().requires_grad_() for t in (x, scales, bias)]
    torch.ops.graphopt.linear_int4(ours[0], pack_int4(q), ours[1], group, ours[2]).backward(grad)
    ref = [t.clone().requires_grad_() for t in (x, scales, bias)]
    weight = q.float() * ref[1].repeat_interleave(group, dim=1)[:, :in_features]
    nn.functional.linear(ref[0], weight, ref[2]).backward(grad)
    for name, a, b in zip(("input", "scales", "bias"), ours, ref):
        assert_close(a.grad, b.grad, "algebraic", what=f"gradient of the {name}")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_digits_at_int4_fine_tuned_stay_within_a_point_of_fp32(name):
    model, fp32_acc = train_digits(digits_cnn() if name == "cnn" else digits_mlp(), epochs=15)
    xtr, ytr, xte, yte = load_digits_split(image=name == "cnn")
    graph = graphopt.optimize(model, (xte[:64],), "fold,quantize{mode=int4,group=128}",
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    (packed_node, scales_node) = _linear_int4_nodes(graph)[0].args[1:3]
    packed, scales = graph.constant(packed_node).clone(), graph.constant(scales_node).clone()
    graphopt.finetune(graph, (xtr, ytr), teacher=model, epochs=1, batch_size=64, progress=False)
    assert torch.equal(graph.constant(packed_node), packed)  # the int4 codes stay,
    assert not torch.equal(graph.constant(scales_node), scales)  # their scales learn
    int4_acc = accuracy(graph, xte, yte)
    assert int4_acc >= fp32_acc - 0.01, (int4_acc, fp32_acc)


def test_group_must_be_one_of_the_supported_sizes():
    with pytest.raises(PipelineError, match="group"):
        _int4(nn.Linear(64, 8), torch.randn(1, 64), group=48)


@pytest.mark.parametrize("group,bias,in_features,out_features,shape", [
    (32, True, 256, 128, (1,)),         # batch-1 GEMV, whole tiles
    (64, False, 96, 40, (3,)),          # output features not a multiple of the 64-wide tile
    (128, True, 67, 10, (2,)),          # odd in_features, one short group
    (32, True, 64, 72, (2, 5)),         # 3-d input: (batch, sequence, features)
])
def test_compiled_int4_matches_the_int4_graph(group, bias, in_features, out_features, shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias), nn.ReLU()).eval()
    x = torch.randn(*shape, in_features)
    graph = _int4(model, x, group)
    compiled = graphopt.compile(graph, "x86", (x,), pipeline="fuse")
    assert_close(compiled(x), graph(x)[0], "algebraic")


def test_compiled_int4_takes_any_batch_size():
    from torch.export import Dim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 16)).eval()
    dynamic = ({0: Dim("batch")},)
    graph = graphopt.optimize(model, (torch.randn(4, 128),), "fold,quantize{mode=int4,group=64}",
                              dynamic_shapes=dynamic)
    compiled = graphopt.compile(graph, "x86", pipeline="fuse")
    for batch in (1, 7):
        x = torch.randn(batch, 128)
        assert_close(compiled(x), graph(x)[0], "algebraic", what=f"batch {batch}")


def test_register_part_fits_both_accumulator_sets_in_the_targets_registers():
    from graphopt.targets.cpu.schedules.int4_linear import register_part
    from graphopt.targets.registry import VectorISA

    assert register_part(64, VectorISA("x86_64", 512, 32, "vnni-512")) == 64   # 4 + 4 zmm
    assert register_part(64, VectorISA("x86_64", 256, 16, "none")) == 32       # 4 + 4 of AVX2's 12
    assert register_part(64, VectorISA("aarch64", 128, 32, "sdot")) == 32      # 8 + 8 of NEON's 24


def _int4_mlp():
    torch.manual_seed(0)
    # out_features 72 and 10: partial 64-wide tiles; in_features 72 at group 32: a short last group
    return nn.Sequential(nn.Linear(96, 72), nn.ReLU(), nn.Linear(72, 10, bias=False)).eval()


def test_int4_kernels_for_arm64_are_scheduled_by_the_int4_rule():
    from graphopt.targets.build import fusion_mode, kernel_rules
    from graphopt.targets.frontend.lower import lower_to_relax
    from graphopt.targets.registry import resolve_target

    graph = _int4(_int4_mlp(), torch.randn(2, 96), group=32)
    rules = dict(kernel_rules(lower_to_relax(graph), resolve_target("arm64"), fusion_mode(graph, None)))
    assert [rules[k] for k in rules if k.startswith("linear_int4")] == ["Int4Linear", "Int4Linear"]


@pytest.mark.emulated
def test_int4_mlp_for_arm64_runs_emulated_like_the_int4_graph(aarch64_env, tmp_path):
    from graphopt.targets.aarch64 import emulation

    model, x = _int4_mlp(), torch.randn(2, 96)
    graph = _int4(model, x, group=32)
    compiled = graphopt.compile(graph, "arm64", (x,), pipeline="fuse")
    (out,) = emulation.run_artifact_emulated(compiled.save(str(tmp_path / "int4-arm64")), [x.numpy()],
                                             timeout=300, env=aarch64_env)
    assert_close(out, graph(x)[0], "algebraic")


def test_int4_artifact_is_at_most_a_fifth_of_fp32(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512)).eval()
    x = torch.randn(1, 512)
    fp32 = graphopt.compile(model, "x86", (x,))
    int4 = graphopt.compile(model, "x86", (x,), pipeline="fold,quantize{mode=int4,group=32},fuse")
    fp32_size = _dir_size(fp32.save(str(tmp_path / "fp32")))
    int4_size = _dir_size(int4.save(str(tmp_path / "int4")))
    assert fp32_size > 4 * 512 * 2048 * 2  # the float weights are in the fp32 artifact
    assert int4_size <= 0.2 * fp32_size, (int4_size, fp32_size)


def test_digits_mlp_at_int4_stays_within_a_point_of_fp32():
    model, fp32_acc = train_digits(digits_mlp())
    _, _, xte, yte = load_digits_split()
    graph = _int4(model, xte[:1], group=32)
    compiled = graphopt.compile(graph, "x86", (xte[:1],), pipeline="fuse")
    int4_acc = accuracy(lambda x: torch.cat([compiled(x[i:i + 1]) for i in range(len(x))]), xte, yte)
    assert int4_acc >= fp32_acc - 0.01, (int4_acc, fp32_acc)
