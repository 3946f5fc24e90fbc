"""The prune pass: dependency groups, physical shrinking, options, and numerics.

Numeric cases use channels that contribute nothing (zeroed weights or BN scales): pruning
exactly those must leave the outputs unchanged, which checks that every coupled constant
was sliced at the right indices.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
import graphopt.models
from graphopt.errors import PassOptionError
from graphopt.passes.prune import ChannelDependencyGraph

torch.manual_seed(0)


def prune(graph, text):
    out = graphopt.optimize(graph, pipeline=text)
    out.check()
    return out


def weight(graph, source):
    """The constant whose model name is ``source`` (e.g. ``conv1.weight``)."""
    for n in graph.nodes:
        if n.op == "get_attr" and n.meta.get("source") == source:
            return graph.constant(n)
    raise KeyError(source)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class ConvBnConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def conv_bn_conv(dead=(1, 3, 4, 6)):
    m = ConvBnConv().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 1.5)
        m.bn1.weight.uniform_(0.5, 1.5)
        for c in dead:  # BN output 0 -> relu 0 -> nothing reaches conv2
            m.bn1.weight[c] = 0.0
            m.bn1.bias[c] = 0.0
    return m


def test_conv_bn_relu_conv_shrinks_every_coupled_tensor_and_keeps_outputs():
    x = torch.randn(2, 3, 8, 8)
    g = graphopt.capture(conv_bn_conv(), x)
    p = prune(g, "prune{ratio=0.5,criterion=bn_scale}")
    keep = torch.tensor([0, 2, 5, 7])
    assert weight(p, "conv1.weight").shape == (4, 3, 3, 3)
    assert weight(p, "bn1.running_mean").shape == (4,)
    assert weight(p, "conv2.weight").shape == (4, 4, 3, 3)
    torch.testing.assert_close(weight(p, "conv2.weight"), weight(g, "conv2.weight")[:, keep])
    assert p.summary().params < g.summary().params and p.summary().flops < g.summary().flops
    close(p(x)[0], g(x)[0])


def test_ratio_zero_leaves_the_graph_identical():
    x = torch.randn(1, 3, 8, 8)
    g = graphopt.capture(conv_bn_conv(), x)
    p = prune(g, "prune{ratio=0}")
    assert str(p) == str(g)
    assert all(torch.equal(t, g.constants()[k]) for k, t in p.constants().items())
    assert torch.equal(p(x)[0], g(x)[0])


@pytest.mark.parametrize("text, message", [
    ("prune{ratio=1.0}", "prune: option ratio=1.0 is out of range [0.0, 1.0)"),
    ("prune{ratio=-0.1}", "out of range"),
    ("prune{criterion=l3}", "is not one of l1, l2, bn_scale, taylor"),
    ("prune{scope=world}", "is not one of local, global"),
])
def test_bad_options_raise_typed_errors(text, message):
    with pytest.raises(PassOptionError, match=message.replace("[", r"\[").replace(")", r"\)")):
        graphopt.Pipeline.parse(text)


def test_taylor_needs_calibration_data():
    g = graphopt.capture(graphopt.models.digits_mlp(), torch.randn(2, 64))
    with pytest.raises(PassOptionError, match="criterion=taylor needs calibration batches"):
        graphopt.optimize(g, pipeline="prune{criterion=taylor}")
    p = graphopt.optimize(g, pipeline="prune{ratio=0.5,criterion=taylor}",
                          calibration_data=[torch.randn(16, 64)])
    assert weight(p, "fc1.weight").shape == (64, 64)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        return self.head(torch.relu(s + self.branch(s)))


def test_residual_add_prunes_every_branch_identically():
    m = Residual().eval()
    dead = [0, 5, 6, 7]
    with torch.no_grad():  # channel c is dead when stem and branch both output 0 there
        for conv in (m.stem, m.branch):
            conv.weight[dead] = 0
            conv.bias[dead] = 0
    x = torch.randn(1, 3, 6, 6)
    g = graphopt.capture(m, x)
    dep = ChannelDependencyGraph(g)
    residual = [grp for grp in dep.groups if "stem" in grp.layers]
    assert len(residual) == 1 and residual[0].layers == ["branch", "stem"] and len(residual[0].units) == 8
    p = prune(g, "prune{ratio=0.5,scope=local}")
    assert weight(p, "stem.weight").shape[0] == weight(p, "branch.weight").shape[0] == 4
    assert weight(p, "branch.weight").shape[1] == 4 and weight(p, "head.weight").shape == (2, 4, 1, 1)
    close(p(x)[0], g(x)[0])


def test_adding_a_graph_input_freezes_the_channels_it_meets():
    class AddInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.out = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.out(x + self.conv(x))

    g = graphopt.capture(AddInput().eval(), torch.randn(1, 4, 5, 5))
    assert ChannelDependencyGraph(g).groups == []
    p = prune(g, "prune{ratio=0.5}")
    assert weight(p, "conv.weight").shape == (4, 4, 3, 3) and p.annotations["prune"][0]["pruned_units"] == 0


def test_concat_offsets_slice_the_consumer_at_the_right_columns():
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 6, 1)
            self.c = nn.Conv2d(10, 2, 1)

        def forward(self, x):
            return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))

    m = Concat().eval()
    with torch.no_grad():
        for conv, dead in ((m.a, [1, 2]), (m.b, [0, 3, 5])):
            conv.weight[dead] = 0
            conv.bias[dead] = 0
    x = torch.randn(1, 3, 4, 4)
    g = graphopt.capture(m, x)
    p = prune(g, "prune{ratio=0.5}")
    kept_columns = torch.tensor([0, 3, 4 + 1, 4 + 2, 4 + 4])
    torch.testing.assert_close(weight(p, "c.weight"), weight(g, "c.weight")[:, kept_columns])
    close(p(x)[0], g(x)[0])


def test_depthwise_conv_follows_its_input_and_rewrites_groups():
    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Conv2d(3, 8, 1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.project = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))

    m = Depthwise().eval()
    with torch.no_grad():
        m.dw.weight[[2, 3, 4, 5]] = 0
        m.dw.bias[[2, 3, 4, 5]] = 0
    x = torch.randn(1, 3, 6, 6)
    g = graphopt.capture(m, x)
    dep = ChannelDependencyGraph(g)
    assert [grp.layers for grp in dep.groups] == [["expand"]]  # dw adds no units of its own
    p = prune(g, "prune{ratio=0.5}")
    conv = next(n for n in p.call_nodes() if n.target is torch.ops.aten.conv2d.default
                and n.args[1].meta.get("source") == "dw.weight")
    assert conv.args[6] == 4 and weight(p, "dw.weight").shape == (4, 1, 3, 3)
    close(p(x)[0], g(x)[0])


def test_grouped_conv_loses_the_same_local_channels_in_every_group():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(torch.relu(self.g(torch.relu(self.a(x)))))

    x = torch.randn(1, 3, 6, 6)
    g = graphopt.capture(Grouped().eval(), x)
    p = prune(g, "prune{ratio=0.5}")
    assert weight(p, "a.weight").shape[0] == 4
    assert weight(p, "g.weight").shape == (4, 2, 3, 3)  # 2 groups of 2 in -> 2 groups of 2 out
    assert p(x)[0].shape == (1, 2, 6, 6)


def test_flatten_into_linear_removes_each_channels_spatial_block():
    m = graphopt.models.digits_cnn()
    with torch.no_grad():
        dead = torch.arange(0, 64, 2)
        m.bn2.weight[dead] = 0
        m.bn2.bias[dead] = 0
    x = torch.rand(2, 1, 8, 8)
    g = graphopt.capture(m, x)
    p = prune(g, "prune{ratio=0.5,criterion=bn_scale}")
    assert weight(p, "fc1.weight").shape == (64, 32 * 4)
    expected = weight(g, "fc1.weight").reshape(128, 64, 4)[:, 1::2].reshape(128, 128)
    # fc1's own rows are pruned too: compare the kept ones
    kept_rows = torch.isin(weight(g, "fc1.bias"), weight(p, "fc1.bias")).nonzero().squeeze(1)
    torch.testing.assert_close(weight(p, "fc1.weight"), expected[kept_rows])
    assert p(x)[0].shape == (2, 10)


def test_mlp_hidden_neurons_shrink_and_the_output_does_not():
    g = graphopt.capture(graphopt.models.digits_mlp(), torch.randn(3, 64), dynamic_shapes="batch")
    p = prune(g, "prune{ratio=0.25}")
    assert weight(p, "fc1.weight").shape == (96, 64) and weight(p, "fc2.weight").shape == (10, 96)
    assert p(torch.randn(7, 64))[0].shape == (7, 10)


def test_output_channels_of_the_model_are_never_pruned():
    g = graphopt.capture(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 1)).eval(),
                         torch.randn(1, 3, 4, 4))
    p = prune(g, "prune{ratio=0.5}")
    assert weight(p, "0.weight").shape[0] == 4 and weight(p, "2.weight").shape == (6, 4, 1, 1)


def test_excluded_layers_keep_all_their_weights():
    g = graphopt.capture(graphopt.models.digits_mlp(), torch.randn(2, 64))
    p = prune(g, "prune{ratio=0.5,exclude=[fc2]}")
    assert weight(p, "fc1.weight").shape == (128, 64) and p.summary().params == g.summary().params
    q = prune(g, "prune{ratio=0.5,exclude=[fc1]}")
    assert weight(q, "fc1.weight").shape == (128, 64)


def test_round_to_keeps_a_multiple_of_round_to():
    g = graphopt.capture(graphopt.models.digits_mlp(), torch.randn(2, 64))
    assert weight(prune(g, "prune{ratio=0.3}"), "fc1.weight").shape[0] == 90
    assert weight(prune(g, "prune{ratio=0.3,round_to=8}"), "fc1.weight").shape[0] == 96


def test_steps_and_global_scope_reach_the_requested_ratio():
    x = torch.randn(1, 3, 8, 8)
    g = graphopt.capture(conv_bn_conv(dead=()), x)
    stepped = prune(g, "prune{ratio=0.5,steps=2}")
    assert weight(stepped, "conv1.weight").shape[0] == 4
    assert [r["pruned_units"] for r in stepped.annotations["prune"]] == [2, 2]
    glob = prune(g, "prune{ratio=0.5,scope=global,criterion=l2}")
    assert weight(glob, "conv1.weight").shape[0] == 4


def test_layer_norm_is_sliced_with_its_features():
    m = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(5, 6)
    g = graphopt.capture(m, x)
    p = prune(g, "prune{ratio=0.5}")
    assert weight(p, "1.weight").shape == (8,) and weight(p, "3.weight").shape == (3, 8)
    ln = next(n for n in p.call_nodes() if "layer_norm" in str(n.target))
    assert list(ln.args[1]) == [8] and p(x)[0].shape == (5, 3)


def small_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()


def test_attention_heads_go_whole_and_consistently_in_q_k_v_and_out_proj():
    m = small_encoder()
    attn = m.layers[0].self_attn
    dead_heads = [1, 2]
    with torch.no_grad():  # a head with zero q/k/v contributes exactly 0 to out_proj
        for h in dead_heads:
            for part in range(3):
                rows = slice(part * 32 + h * 8, part * 32 + (h + 1) * 8)
                attn.in_proj_weight[rows] = 0
                attn.in_proj_bias[rows] = 0
    x = torch.randn(1, 10, 32)
    g = graphopt.capture(m, x)
    dep = ChannelDependencyGraph(g)
    heads = next(grp for grp in dep.groups if grp.layers == ["layers.0.self_attn"])
    assert len(heads.units) == 4 and heads.channels == 96
    p = prune(g, "prune{ratio=0.5,exclude=[layers.0.linear1]}")
    assert weight(p, "layers.0.self_attn.in_proj_weight").shape == (48, 32)
    assert weight(p, "layers.0.self_attn.out_proj.weight").shape == (32, 16)
    assert weight(p, "layers.0.linear1.weight").shape == (64, 32)
    close(p(x)[0], g(x)[0])
    # excluding the output projection (a name inside the attention module) keeps every head
    q = prune(g, "prune{ratio=0.5,exclude=[layers.0.self_attn.out_proj]}")
    assert weight(q, "layers.0.self_attn.in_proj_weight").shape == (96, 32)
    assert weight(q, "layers.0.linear1.weight").shape == (32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "transformer"])
def test_reference_models_prune_shrink_and_compile(name):
    ref = graphopt.models.REFERENCE_MODELS[name]
    x = ref.example_input()
    g = graphopt.capture(ref.build(), x)
    base = g.summary()
    for ratio in (0.3, 0.5):
        p = prune(g, f"prune{{ratio={ratio}}}")
        s = p.summary()
        assert p(x)[0].shape == g(x)[0].shape
        assert s.params < base.params and s.flops < base.flops
        if ratio == 0.5:
            assert s.flops <= 0.65 * base.flops
            compiled = graphopt.compile(p, "x86", pipeline="dce")
            out = compiled(x)
            y = torch.as_tensor(out[0] if isinstance(out, (tuple, list)) else out)
            ref_out = p(x)[0]
            scale = ref_out.abs().max()
            torch.testing.assert_close(y / scale, ref_out / scale, rtol=1e-4, atol=1e-4)


class SharedBias(nn.Module):
    """Two layers reading one bias tensor, as constant folding leaves equal folded biases."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2.bias = self.conv1.bias
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def test_constant_shared_by_differently_pruned_layers_gets_a_copy_per_layer():
    x = torch.randn(1, 3, 8, 8)
    g = graphopt.capture(SharedBias().eval(), x)
    p = prune(g, "prune{ratio=0.5}")
    convs = [n for n in p.nodes if n.op == "call_function" and "conv" in str(n.target)]
    biases = [p.constant(n.args[2]) for n in convs]
    assert [tuple(b.shape) for b in biases] == [(4,), (4,), (4,)]
    assert convs[0].args[2] is not convs[1].args[2]
    assert p(x)[0].shape == (1, 4, 8, 8)


class CumsumOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv3(torch.cumsum(self.conv2(torch.relu(self.conv1(x))), 1))


def test_report_lists_every_group_pruned_or_kept_with_why():
    x = torch.randn(1, 3, 8, 8)
    g = graphopt.capture(CumsumOverChannels().eval(), x)
    p = prune(g, "prune{ratio=0.5}")
    rows = {tuple(r["layers"]): r for r in p.annotations["prune_report"]}
    assert rows[("conv1",)]["status"] == "pruned" and rows[("conv1",)]["channels_after"] == 4
    kept = rows[("conv2",)]
    assert kept["status"] == "kept" and kept["channels_after"] == 8 and "cumsum" in kept["reason"]
    assert "graph output" in rows[("conv3",)]["reason"]
    assert weight(p, "conv2.weight").shape == (8, 4, 3, 3)


class TransposedLinear(nn.Module):
    """``bias + x @ w`` with ``w`` stored (in, out), as HF's GPT-2 ``Conv1D`` computes."""

    def __init__(self, dead=(0, 3, 5, 6, 9, 10, 12, 15)):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(16))
        self.w2, self.b2 = nn.Parameter(torch.randn(16, 4)), nn.Parameter(torch.randn(4))
        with torch.no_grad():
            for c in dead:  # nothing flows through these hidden units
                self.w1[:, c], self.b1[c], self.w2[c] = 0.0, 0.0, 0.0

    def forward(self, x):
        return torch.addmm(self.b2, torch.relu(torch.addmm(self.b1, x, self.w1)), self.w2)


def test_transposed_linear_layers_prune_their_dead_units_exactly():
    x = torch.randn(2, 8)
    g = graphopt.capture(TransposedLinear(), x)
    p = prune(g, "prune{ratio=0.5}")
    assert weight(p, "w1").shape == (8, 8) and weight(p, "b1").shape == (8,) and weight(p, "w2").shape == (8, 4)
    close(p(x)[0], g(x)[0])
