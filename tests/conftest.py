"""Shared fixtures. TVM uses every core (2 here); torch too, so timings are comparable."""

import os

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
# a schedule rule that raises fails the test (a build would warn and use the next rule)
os.environ.setdefault("GRAPHOPT_STRICT_RULES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


class ConvBnNet(torch.nn.Module):
    """conv -> BN -> relu -> dropout -> flatten -> linear: every foundation pass has work here."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(8 * 6 * 6, 4)
        with torch.no_grad():  # non-trivial running statistics, so folding is not a no-op
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(torch.flatten(self.drop(torch.relu(self.bn(self.conv(x)))), 1))


@pytest.fixture
def conv_bn_net():
    torch.manual_seed(0)
    return ConvBnNet().eval(), (torch.randn(1, 3, 8, 8),)
