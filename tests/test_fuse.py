"""The ``fuse`` pass: which groups it forms, which it must not, and that backends obey them.

Structure: build a tiny model, capture it, run ``fuse``, assert the groups (as op names).
Kernels: lower the graph to TVM and count the kernels ``main`` launches; it must equal
what the graph says (one per group plus one per ungrouped computing op).
Numbers: fused and unfused builds of the reference models against eager PyTorch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import GraphInvariantError, PassOptionError
from graphopt.models import REFERENCE_MODELS
from graphopt.passes.fuse import Fuse, expected_kernels
from graphopt.fusion_groups import node_groups, validate_groups
from graphopt.passes.fusion.groups import Grouping
from graphopt.pipeline import DEFAULT_PIPELINE, Pipeline
from graphopt.printer import op_name
from graphopt.testing import assert_matches_eager


def fused(model: nn.Module, *inputs: torch.Tensor, pipeline: str = "fuse") -> graphopt.Graph:
    return graphopt.optimize(model.eval(), inputs, pipeline, verify=True)


def groups(graph) -> list[list[str]]:
    """Each group as the op names of its members, in graph order."""
    return [[op_name(n) for n in members] for _, members in sorted(node_groups(graph).items())]


def node(graph, name: str):
    return next(n for n in graph.nodes if n.name == name)


def kernels_launched(graph, fusion: str = "graph", target: str = "x86") -> int:
    from graphopt.targets.build import kernel_launches
    from graphopt.targets.frontend.lower import lower_to_relax
    from graphopt.targets.registry import resolve_target

    return len(kernel_launches(lower_to_relax(graph), resolve_target(target), fusion))


# ------------------------------------------------------------------------------- models

class LinearAct(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc, self.act = nn.Linear(16, 8), act

    def forward(self, x):
        return self.act(self.fc(x))


class ResidualConv(nn.Module):
    """conv -> relu -> conv -> +x -> relu: resnet's basic block without BN."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.c2(torch.relu(self.c1(x))) + x)


class ScaledMatmulClamp(nn.Module):
    def forward(self, a, b):
        return torch.clamp(torch.matmul(a, b) * 0.5, -1.0, 1.0)


class ElementwiseChain(nn.Module):
    def forward(self, x):
        return torch.tanh(torch.sigmoid(torch.exp(x * 2.0)))


class AddLayerNormGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)

    def forward(self, x, y):
        return F.gelu(self.norm(x + y))


class SoftmaxAttention(nn.Module):
    """The attention block spelled out: matmul -> scale -> softmax -> matmul."""

    def forward(self, q, k, v):
        return torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.125, dim=-1) @ v


class SelfAttention(nn.Module):
    """Q/K/V projection, head split, SDPA, head merge: the encoder's attention."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.qkv, self.heads = nn.Linear(d, 3 * d), heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(b, s, d)


class SharedValue(nn.Module):
    """The linear's output is used by relu AND by the add: it must leave its kernel."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = self.fc(x)
        return torch.relu(h) * 3.0, h


class Diamond(nn.Module):
    """exp -> cumsum (never fused) -> add(exp, .): fusing exp with the add needs cumsum inside."""

    def forward(self, x):
        e = torch.exp(x)
        return e + torch.cumsum(e, dim=-1)


# ---------------------------------------------------------------------- each pattern

@pytest.mark.parametrize("act, name", [(nn.ReLU(), "relu"), (nn.ReLU6(), "hardtanh"), (nn.GELU(), "gelu"),
                                       (nn.SiLU(), "silu"), (nn.Sigmoid(), "sigmoid"),
                                       (nn.Hardswish(), "hardswish"), (nn.Tanh(), "tanh")])
def test_epilogue_linear_activation(act, name):
    g = fused(LinearAct(act), torch.randn(2, 16))
    assert groups(g) == [["linear", name]]
    assert g.annotations["fusion"][0]["pattern"] == "epilogue"
    assert expected_kernels(g) == 1


def test_epilogue_conv_residual_add_relu():
    g = fused(ResidualConv(), torch.randn(1, 4, 8, 8))
    assert groups(g) == [["conv2d", "relu"], ["conv2d", "add.Tensor", "relu"]]


def test_epilogue_matmul_scale_clamp():
    g = fused(ScaledMatmulClamp(), torch.randn(4, 8), torch.randn(8, 4))
    (members,) = groups(g)
    assert members[0] == "matmul" and members[1:] == ["mul.Tensor", "clamp"]


def test_elementwise_chain():
    g = fused(ElementwiseChain(), torch.randn(3, 5))
    assert groups(g) == [["mul.Tensor", "exp", "sigmoid", "tanh"]]
    assert g.annotations["fusion"][0]["pattern"] == "elementwise"


def test_reduction_with_prologue_and_epilogue():
    g = fused(AddLayerNormGelu(), torch.randn(2, 32), torch.randn(2, 32))
    assert groups(g) == [["add.Tensor", "layer_norm", "gelu"]]
    assert g.annotations["fusion"][0]["pattern"] == "reduction"


def test_attention_chain_is_one_group():
    q, k, v = (torch.randn(2, 16, 8) for _ in range(3))
    g = fused(SoftmaxAttention(), q, k, v)
    (members,) = groups(g)
    assert [m for m in members if m != "transpose.int"] == ["matmul", "mul.Tensor", "softmax.int", "matmul"]
    assert g.annotations["fusion"][0]["pattern"] == "attention"


def test_attention_takes_head_split_and_merge():
    g = fused(SelfAttention(), torch.randn(1, 8, 32))
    by_pattern = {r["pattern"]: r for r in g.annotations["fusion"].values()}
    attention = by_pattern["attention"]["nodes"]
    assert any("scaled_dot_product_attention" in n for n in attention)
    assert {"view", "permute", "unbind", "transpose"} <= set(attention)  # head split and merge inside
    # the projection keeps its own kernel; the attention block (with its layout ops) is one more
    assert expected_kernels(g) == 2


# ------------------------------------------------------------------ what must not fuse

def test_value_used_outside_group_does_not_fuse():
    g = fused(SharedValue(), torch.randn(2, 16))
    linear = next(n for n in g.call_nodes() if op_name(n) == "linear")
    assert "fusion_group" not in linear.meta
    assert groups(g) == [["relu", "mul.Tensor"]]


def test_group_that_would_create_a_cycle_does_not_fuse():
    g = fused(Diamond(), torch.randn(2, 8))
    exp, add = node(g, "exp"), node(g, "add")
    assert exp.meta.get("fusion_group") is None or exp.meta.get("fusion_group") != add.meta.get("fusion_group")
    # the engine's own check: contracting {exp, add} would route through cumsum both ways
    grouping = Grouping(g, max_group_size=16)
    gid = grouping.new_group("elementwise", add)
    assert grouping._creates_cycle(gid, exp)
    assert not grouping.can_add(gid, exp)
    # a hand-made cyclic group is refused before lowering
    for n in g.nodes:
        n.meta.pop("fusion_group", None)
    exp.meta["fusion_group"] = add.meta["fusion_group"] = 0
    with pytest.raises(GraphInvariantError, match="fusion group 0 has 2 values used outside it"):
        validate_groups(g)


def test_max_group_size_and_pattern_selection():
    x = torch.randn(1, 4, 8, 8)
    assert groups(fused(ResidualConv(), x, pipeline="fuse{max_group_size=2}")) == \
        [["conv2d", "relu"], ["conv2d", "add.Tensor"]]
    assert groups(fused(ResidualConv(), x, pipeline="fuse{patterns=[elementwise]}")) == [["add.Tensor", "relu"]]
    with pytest.raises(PassOptionError, match="not one of"):
        Pipeline.parse("fuse{patterns=[vertical]}")
    with pytest.raises(PassOptionError, match="out of range"):
        Fuse(max_group_size=1)


def test_pipeline_text_round_trips_and_default_fuses():
    text = "fuse{patterns=[epilogue,attention],max_group_size=8}"
    assert str(Pipeline.parse(text)) == text
    assert DEFAULT_PIPELINE == "fold,fuse"


def test_groups_show_in_ir_summary_and_picture():
    g = fused(ResidualConv(), torch.randn(1, 4, 8, 8))
    assert "# group 0" in str(g) and "# group 1" in str(g)
    assert "fusion groups: 2" in str(g.summary())
    assert 'subgraph "cluster_group_1"' in __import__("graphopt.visualize", fromlist=["to_dot"]).to_dot(g)


def test_stats_count_patterns():
    g = fused(ResidualConv(), torch.randn(1, 4, 8, 8))
    (record,) = [r for r in g.annotations["pass_records"] if r["pass"] == "fuse"]
    assert record["stats"]["pattern.epilogue"] == 2 and record["stats"]["groups"] == 2
    # intermediates that stay inside kernels: both conv outputs and the residual sum
    assert record["stats"]["bytes_saved"] == 3 * (4 * 8 * 8) * 4


# -------------------------------------------------------------- backends obey the groups

@pytest.mark.parametrize("model, inputs", [
    (ResidualConv(), (torch.randn(1, 4, 8, 8),)),
    (SoftmaxAttention(), tuple(torch.randn(2, 16, 8) for _ in range(3))),
    (SelfAttention(), (torch.randn(1, 8, 32),)),
    (AddLayerNormGelu(), (torch.randn(2, 32), torch.randn(2, 32))),
    (SharedValue(), (torch.randn(2, 16),)),
])
def test_one_kernel_per_group_in_the_built_module(model, inputs):
    g = fused(model, *inputs)
    assert node_groups(g)
    assert kernels_launched(g, "graph") == expected_kernels(g)
    module = graphopt.compile(g, "x86")
    assert module.manifest["fusion"] == "graph"
    assert_matches_eager(module(*inputs), model.eval(), inputs)


def test_reference_model_kernel_counts_match_the_graph():
    ref = REFERENCE_MODELS["transformer"]
    g = graphopt.optimize(ref.build(), (ref.example_input(),), "fold,fuse")
    n = expected_kernels(g)
    assert kernels_launched(g, "graph") == n
    assert n < kernels_launched(g, "tvm") < kernels_launched(g, "none")


def test_fusion_mode_follows_the_graph():
    from graphopt.errors import CompilationError
    from graphopt.targets.build import fusion_mode

    x = torch.randn(1, 4, 8, 8)
    plain, grouped = fused(ResidualConv(), x, pipeline="fold"), fused(ResidualConv(), x, pipeline="fold,fuse")
    assert fusion_mode(plain, None) == "none"  # no fuse in the pipeline: TVM's fusion is off too
    assert fusion_mode(grouped, None) == "graph"
    assert fusion_mode(grouped, "tvm") == "tvm"
    with pytest.raises(CompilationError, match="unknown fusion mode 'fast'"):
        fusion_mode(grouped, "fast")


def _check_reference(name: str, modes=("graph", "none")):
    ref = REFERENCE_MODELS[name]
    model, x = ref.build(), ref.example_input()
    for mode in modes:
        module = graphopt.compile(model, "x86", (x,), "fold,fuse", fusion=mode)
        out = module(x)
        assert_matches_eager(out, model, (x,))


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_reference_models_fused_and_unfused_match_eager(name):
    _check_reference(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_big_reference_models_fused_and_unfused_match_eager(name):
    _check_reference(name)


def test_cuda_build_of_fused_graph_compiles():
    # no GPU needed to compile; dlight schedules every fused kernel (an unbound one would fail)
    g = fused(SelfAttention(), torch.randn(1, 8, 32), pipeline="fold,fuse")
    module = graphopt.compile(g, "cuda")
    assert module.manifest["fusion"] == "graph" and module.graph.annotations["fusion"]


@pytest.mark.slow
def test_cuda_build_of_fused_transformer_compiles():
    ref = REFERENCE_MODELS["transformer"]
    module = graphopt.compile(ref.build(), "cuda", (ref.example_input(),), "fold,fuse")
    assert module.manifest["fusion"] == "graph"
    assert len(module.graph.annotations["fusion"]) == 8  # per layer: attention + 3 linear epilogues


class MaskFilledInNewZeros(nn.Module):
    """swin's shifted-window mask: regions of ``x.new_zeros`` filled with their number, then
    turned into an additive mask; a fill of a slice of a value computed from the input too."""

    def forward(self, x):
        regions = x.new_zeros((4, 4))
        regions[:2, 2:] = 1.0
        regions[2:, :] = 2.0
        mask = (regions.view(1, 16).unsqueeze(2) - regions.view(1, 16).unsqueeze(1)).masked_fill(
            regions.view(1, 16, 1) != 0, -100.0)
        scratch = torch.relu(x)
        scratch[:, :1].fill_(3.0)
        return torch.softmax(x + mask, -1) + scratch


def test_a_mask_filled_into_a_static_fill_is_computed_while_building_not_fused():
    # swin_t: the mask's ops read x only for its shape; as a group they formed a kernel that
    # TVM folded to a constant, and FuseTIR stopped on a function with nothing to compute.
    from graphopt.fusion_groups import compile_time_nodes

    model, x = MaskFilledInNewZeros().eval(), torch.randn(1, 16, 16)
    graph = fused(model, x, pipeline=DEFAULT_PIPELINE)
    on_constants = compile_time_nodes(graph)
    assert {"new_zeros", "fill", "slice_scatter", "masked_fill"} <= {op_name(n).split(".")[0] for n in on_constants}
    assert not {n for members in node_groups(graph).values() for n in members} & on_constants
    module = graphopt.compile(model, "x86", (x,))
    assert_matches_eager(module(x), model, (x,))
