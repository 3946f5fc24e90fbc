"""fold-bn: BatchNorm folded into the conv/linear before it (algebraic rung: rtol 1e-4, atol 1e-5)."""

import torch
import torch.nn as nn

import graphopt
from graphopt.printer import op_name
from graphopt.testing import assert_close


def ops(graph):
    return [op_name(n) for n in graph.call_nodes()]


def test_conv_bn_folds_into_conv_weights(conv_bn_net):
    m, (x,) = conv_bn_net
    g = graphopt.capture(m, x)
    assert "_native_batch_norm_legit_no_training" in ops(g)
    out = graphopt.optimize(g, pipeline="fold-bn")
    assert "_native_batch_norm_legit_no_training" not in ops(out)
    assert ops(out).count("conv2d") == 1
    conv = next(n for n in out.call_nodes() if op_name(n) == "conv2d")
    assert out.constant(conv.args[2]).shape == (8,)  # the folded bias
    assert_close(out(x), m(x))


def test_conv_without_bias_gets_one():
    m = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        m[1].running_mean.fill_(0.5)
    x = torch.randn(1, 2, 5, 5)
    out = graphopt.optimize(m, x, pipeline="fold-bn")
    assert ops(out) == ["conv2d"]
    assert_close(out(x), m(x))


def test_linear_bn1d_folds():
    m = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).eval()
    with torch.no_grad():
        m[1].running_var.fill_(2.0)
    x = torch.randn(4, 5)
    out = graphopt.optimize(m, x, pipeline="fold-bn")
    assert ops(out) == ["linear"]
    assert_close(out(x), m(x))


def test_does_not_fold_when_conv_output_is_used_elsewhere():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the un-normalized y is needed too

    m, x = Shared().eval(), torch.randn(1, 2, 3, 3)
    out = graphopt.optimize(m, x, pipeline="fold-bn")
    assert "_native_batch_norm_legit_no_training" in ops(out)
    assert_close(out(x), m(x))


def test_does_not_fold_bn_after_non_linear_op():
    m = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.BatchNorm2d(2)).eval()
    x = torch.randn(1, 2, 3, 3)
    out = graphopt.optimize(m, x, pipeline="fold-bn")
    assert "_native_batch_norm_legit_no_training" in ops(out)


def test_each_fold_is_counted_under_its_rule():
    from graphopt.passes.fold_batchnorm import FoldBatchNorm

    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 3), nn.BatchNorm1d(3),
                      nn.Unflatten(1, (3, 1, 1)), nn.ConvTranspose2d(3, 2, 2), nn.BatchNorm2d(2)).eval()
    x = torch.randn(1, 2, 5, 5)
    result = FoldBatchNorm().run(graphopt.capture(m, x))
    assert result.stats == {"folded": 3, "pattern.conv-bn": 1, "pattern.linear-bn": 1,
                            "pattern.conv-transpose-bn": 1}
    out = graphopt.optimize(m, x, pipeline="fold-bn")
    assert "_native_batch_norm_legit_no_training" not in ops(out)
    assert_close(out(x), m(x))
