"""``sparsify``: weights become exact zeros in unstructured, N:M and block patterns, and stay zero.

Structure first (the share of zeros per layer and over the model, every 2:4 group, every
block), then the options and their errors, then fine-tuning (the zeros survive it, the L1
penalty shrinks weights), the compiled sparse graph against the eager one on the fp32
rung, and real accuracy: the digits MLP and CNN at 80% and 90% sparsity within one point of
fp32 after fine-tuning.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
import graphopt.models as models
from graphopt.errors import PassError, PassOptionError, PipelineError
from graphopt.pipeline import Pipeline
from graphopt.testing import assert_close, float64_run


class ConvNet(nn.Module):
    """1x1 conv, 3x3 conv, depthwise conv, two linears (the head's 10 rows split 4x4 blocks unevenly)."""

    def __init__(self):
        super().__init__()
        self.pointwise = nn.Conv2d(16, 32, 1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.depthwise(torch.relu(self.conv(torch.relu(self.pointwise(x))))))
        return self.head(torch.relu(self.fc(x.flatten(1))))


class TiedLM(nn.Module):
    """An embedding table shared with the output projection."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.mix = nn.Linear(32, 32)
        self.out = nn.Linear(32, 50, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.relu(self.mix(self.embed(ids))))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: more threads only add contention on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return ConvNet().eval(), torch.randn(2, 16, 4, 4)


def _sparsify(model, x, options=""):
    return graphopt.optimize(model, (x,), f"sparsify{{{options}}}" if options else "sparsify")


def _weights(graph):
    """{layer: weight} of the sparsified layers."""
    return {e["layer"]: getattr(graph.gm, name) for name, e in graph.annotations["sparsity"].items()}


def _tap_matrices(w):
    """(taps, out, in): the matrix view the patterns are laid over."""
    return w.unsqueeze(0) if w.dim() == 2 else w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_layer_scope_zeroes_exactly_that_share_of_every_layer(convnet, sparsity):
    model, x = convnet
    graph = _sparsify(model, x, f"sparsity={sparsity}")
    weights = _weights(graph)
    assert sorted(weights) == ["conv", "fc", "head", "pointwise"]  # depthwise stays dense
    for layer, w in weights.items():
        assert int((w == 0).sum()) == round(sparsity * w.numel()), layer
        original = dict(model.named_parameters())[f"{layer}.weight"].detach()
        kept = w != 0
        assert torch.equal(w[kept], original[kept])  # kept weights are untouched
        assert original[kept].abs().min() >= original[~kept].abs().max()  # and they are the largest
    entry = graph.annotations["sparsity"]["p_fc_weight"]
    assert entry == {"layer": "fc", "op": "linear", "pattern": "unstructured",
                     "sparsity": pytest.approx(sparsity, abs=1e-4), "criterion": "magnitude"}
    assert graph.annotations["sparsity_skipped"] == [
        {"weight": "p_depthwise_weight", "layer": "depthwise", "reason": "depthwise convolution"}]


def test_global_scope_zeroes_that_share_of_all_weights_unevenly(convnet):
    model, x = convnet
    graph = _sparsify(model, x, "sparsity=0.7,scope=global")
    weights = _weights(graph).values()
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    assert zeros == round(0.7 * total)
    shares = [float((w == 0).float().mean()) for w in weights]
    assert max(shares) - min(shares) > 0.05  # one threshold: layers of small weights lose more
    assert all(s < 1.0 for s in shares)


@pytest.mark.parametrize("m", [4, 8])
def test_two_of_four_keeps_the_largest_n_of_every_m_inputs(convnet, m):
    model, x = convnet
    n = m // 2
    graph = _sparsify(model, x, f"pattern={n}:{m}")
    for layer, w in _weights(graph).items():
        original = _tap_matrices(dict(model.named_parameters())[f"{layer}.weight"].detach())
        groups = _tap_matrices(w).reshape(*original.shape[:2], -1, m)
        assert bool(((groups != 0).sum(-1) == n).all()), layer  # random weights: exactly n survive
        ranked = original.reshape(groups.shape).abs().sort(-1, descending=True).values
        assert torch.equal(groups.abs().sort(-1, descending=True).values[..., :n], ranked[..., :n])
        assert graph.annotations["sparsity"][f"p_{layer}_weight"]["sparsity"] == 1 - n / m
    assert graph.annotations["sparsity"]["p_fc_weight"]["n"] == n


@pytest.mark.parametrize("block", [(1, 16), (4, 4), (3, 5)])
def test_blocks_are_zero_or_kept_whole(convnet, block):
    model, x = convnet
    r, c = block
    graph = _sparsify(model, x, f"sparsity=0.75,pattern=block,block={r}x{c}")
    for layer, w in _weights(graph).items():
        for matrix in _tap_matrices(w):
            for i in range(0, matrix.shape[0], r):
                for j in range(0, matrix.shape[1], c):
                    zeros = int((matrix[i:i + r, j:j + c] == 0).sum())
                    assert zeros in (0, matrix[i:i + r, j:j + c].numel()), (layer, i, j)
        if w.shape[0] % r == 0 and w.shape[1] % c == 0:  # whole blocks only: the exact share
            assert int((w == 0).sum()) == round(0.75 * w.numel() / (r * c)) * r * c, layer
    assert graph.annotations["sparsity"]["p_conv_weight"]["block"] == [r, c]


def test_weights_shared_with_an_embedding_stay_dense():
    torch.manual_seed(0)
    graph = _sparsify(TiedLM().eval(), torch.randint(0, 50, (2, 7)), "sparsity=0.5")
    assert [e["layer"] for e in graph.annotations["sparsity"].values()] == ["mix"]
    (skipped,) = graph.annotations["sparsity_skipped"]
    assert skipped["layer"] == "out" and skipped["reason"].startswith("also read by embedding")


def test_n_of_m_leaves_layers_whose_inputs_do_not_divide_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    graph = _sparsify(model, torch.randn(2, 6), "pattern=2:4")
    assert [e["layer"] for e in graph.annotations["sparsity"].values()] == ["2"]
    assert graph.annotations["sparsity_skipped"] == [
        {"weight": "p_0_weight", "layer": "0", "reason": "6 inputs per output are not a multiple of M=4"}]


def test_exclude_takes_globs_and_rejects_a_pattern_matching_nothing(convnet):
    model, x = convnet
    graph = _sparsify(model, x, "sparsity=0.5,exclude=[*conv,head]")
    assert [e["layer"] for e in graph.annotations["sparsity"].values()] == ["pointwise", "fc"]
    assert {s["layer"]: s["reason"] for s in graph.annotations["sparsity_skipped"]}["head"] == "excluded"
    with pytest.raises(PassError, match="exclude pattern 'fc9' matches no sparsifiable layer; layers are: conv, fc"):
        _sparsify(model, x, "exclude=[fc9]")


def test_zero_sparsity_leaves_the_graph_as_it_was(convnet):
    model, x = convnet
    graph = _sparsify(model, x, "sparsity=0.0")
    assert "sparsity" not in graph.annotations
    assert_close(graph(x), model(x), "exact")


def test_a_second_sparsify_keeps_the_first_ones_zeros(convnet):
    model, x = convnet
    half = _sparsify(model, x, "sparsity=0.5")
    more = graphopt.optimize(half, pipeline="sparsify{sparsity=0.8}")
    for layer, w in _weights(more).items():
        assert bool((w[_weights(half)[layer] == 0] == 0).all()), layer
        assert int((w == 0).sum()) == round(0.8 * w.numel())


def test_taylor_criterion_scores_with_the_calibration_data(convnet):
    model, x = convnet
    batches = [torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    graph = graphopt.optimize(model, (x,), "sparsify{sparsity=0.6,criterion=taylor}", calibration_data=batches)
    by_magnitude = _sparsify(model, x, "sparsity=0.6")
    for layer, w in _weights(graph).items():
        assert int((w == 0).sum()) == round(0.6 * w.numel())
    assert not torch.equal(_weights(graph)["fc"] == 0, _weights(by_magnitude)["fc"] == 0)
    with pytest.raises(PassOptionError, match="criterion=taylor needs calibration batches"):
        _sparsify(model, x, "criterion=taylor")


def test_verify_holds_the_sparse_graph_to_the_lossy_rung(convnet):
    model, x = convnet
    graph = graphopt.optimize(model, (x,), "fold,sparsify{sparsity=0.9,pattern=block,block=1x16}", verify=True)
    assert "| sparsify{sparsity=0.9,pattern=block,block=1x16} | lossy |" in graph.annotations["verify"]


def test_inspect_lists_the_sparse_and_the_dense_weights(tmp_path, capsys):
    from graphopt.cli import main

    assert main(["inspect", "digits_cnn", "--pipeline", "sparsify{pattern=2:4}",
                 "--picture", str(tmp_path / "g.svg")]) == 0
    printed = capsys.readouterr().out
    assert "sparse weights (sparsify):" in printed
    assert "p_fc1_weight                 fc1                  2:4               50.0%" in printed
    assert "dense                    (1 inputs per output are not a multiple of M=4)" in printed


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("text", ["sparsify{sparsity=0.9,pattern=block,block=1x16}", "sparsify{pattern=2:4}",
                                  "sparsify{sparsity=0.5,scope=global,criterion=taylor,exclude=[fc*,head]}",
                                  "fold,sparsify,fuse"])
def test_pipeline_text_round_trips(text):
    assert str(Pipeline.parse(text)) == text
    assert Pipeline.parse(str(Pipeline.parse(text))) == Pipeline.parse(text)


@pytest.mark.parametrize("text, message", [
    ("sparsify{pattern=4:2}", "needs 0 < N < M <= 64"),
    ("sparsify{pattern=2:128}", "needs 0 < N < M <= 64"),
    ("sparsify{pattern=dense}", "is not one of unstructured, block or N:M"),
    ("sparsify{pattern=block,block=16}", "is not RxC"),
    ("sparsify{pattern=block,block=0x4}", "is not RxC"),
    ("sparsify{block=4x4}", "block=4x4 applies only to pattern=block"),
    ("sparsify{sparsity=1.0}", "out of range"),
    ("sparsify{sparsity=0.9,pattern=2:4}", "zeroes 0.5 of the weights; sparsity=0.9 contradicts it"),
    ("sparsify{pattern=2:4,scope=global}", "scope=global does not apply"),
    ("sparsify{scope=model}", "is not one of layer, global"),
    ("sparsify{ratio=0.5}", "has no option 'ratio'"),
])
def test_bad_options_are_typed_errors(text, message):
    with pytest.raises(PipelineError, match=message) as info:
        Pipeline.parse(text)
    if "has no option" not in message:
        assert isinstance(info.value, PassOptionError)


def test_n_of_m_takes_its_own_sparsity():
    assert Pipeline.parse("sparsify{pattern=1:4}").passes[0].target_sparsity == 0.75
    assert Pipeline.parse("sparsify{sparsity=0.75,pattern=1:4}").passes[0].target_sparsity == 0.75
    assert Pipeline.parse("sparsify").passes[0].target_sparsity == 0.5


# ----------------------------------------------------------------------------- fine-tuning


def _random_digits(n=256):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("options", ["pattern=2:4", "sparsity=0.9,pattern=block,block=4x4", "sparsity=0.8"])
def test_finetune_keeps_every_zero_and_trains_the_rest(options):
    teacher = models.digits_mlp()
    sparse = graphopt.optimize(teacher, (torch.randn(4, 64),), f"sparsify{{{options}}}", dynamic_shapes="batch")
    before = {layer: w.clone() for layer, w in _weights(sparse).items()}
    graphopt.finetune(sparse, _random_digits(), teacher=teacher, distill=True, epochs=2, weight_decay=1e-3,
                      sparsity_l1=1e-4, progress=False)
    for layer, w in _weights(sparse).items():
        assert torch.equal(w == 0, before[layer] == 0), layer  # the same zeros, no new ones
        assert not torch.equal(w, before[layer]), layer  # the kept weights trained
        assert not w.requires_grad


def test_sparsity_l1_pulls_weights_towards_zero():
    teacher = models.digits_mlp()
    norms = []
    for l1 in (0.0, 1e-3):
        graph = graphopt.capture(teacher, torch.randn(4, 64), dynamic_shapes="batch")
        graphopt.finetune(graph, _random_digits(), teacher=teacher, epochs=2, sparsity_l1=l1, progress=False)
        norms.append(float(graph.gm.p_fc1_weight.abs().sum() + graph.gm.p_fc2_weight.abs().sum()))
    assert norms[1] < 0.97 * norms[0]
    with pytest.raises(graphopt.errors.InputError, match="sparsity_l1 must be >= 0"):
        graphopt.finetune(graph, _random_digits(), sparsity_l1=-1.0)


# ----------------------------------------------------------------------------- compiled, and on real data


@pytest.fixture(scope="module")
def digits():
    """The digits MLP and CNN trained as the prune tests train them, and their data."""
    trained = {}
    for name, image in (("digits_mlp", False), ("digits_cnn", True)):
        model, _ = models.train_digits(getattr(models, name)(), epochs=30)
        trained[name] = (model, models.load_digits_split(image=image))
    return trained


def test_compiled_sparse_cnn_matches_the_eager_sparse_graph(digits):
    model, (_, _, x_test, _) = digits["digits_cnn"]
    x = x_test[:8]
    graph = graphopt.optimize(model, (x,), "fold,sparsify{sparsity=0.8,pattern=block,block=1x16}")
    compiled = graphopt.compile(graph, "x86", pipeline="fuse")
    assert_close(compiled(x), graph(x)[0], "algebraic", truth=lambda: float64_run(graph.gm, (x,))[0])


# One-shot global magnitude sparsity, then distillation from the dense model.
@pytest.mark.parametrize("name, epochs", [("digits_mlp", 30), ("digits_cnn", 10)])
@pytest.mark.parametrize("sparsity", [0.8, 0.9])
def test_sparse_digits_model_recovers_within_one_point(digits, name, epochs, sparsity):
    model, (x_train, y_train, x_test, y_test) = digits[name]
    baseline = models.accuracy(model, x_test, y_test)
    graph = graphopt.optimize(model, (x_test[:8],), f"sparsify{{sparsity={sparsity},scope=global}}",
                              dynamic_shapes="batch")
    graphopt.finetune(graph, (x_train, y_train), teacher=model, epochs=epochs, lr=5e-3, progress=False)
    weights = _weights(graph).values()
    assert sum(int((w == 0).sum()) for w in weights) == round(sparsity * sum(w.numel() for w in weights))
    accuracy = models.accuracy(graph, x_test, y_test)
    assert baseline > 0.95
    assert accuracy >= baseline - 0.010, f"{name} at {sparsity:.0%}: {accuracy:.4f} vs dense {baseline:.4f}"
