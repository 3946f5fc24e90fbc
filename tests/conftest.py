"""Shared fixtures. TVM and torch share the cores: every core (2 here) in a serial run; under
pytest-xdist (.ci/run: ``-n auto``) the cores are split between the workers, but never below 2
threads, so that parallel kernels and the thread-pool tests still have two threads to run."""

import os

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(2, len(os.sched_getaffinity(0)) // _WORKERS)
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
# a schedule rule that raises fails the test (a build would warn and use the next rule)
os.environ.setdefault("GRAPHOPT_STRICT_RULES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(min(torch.get_num_threads(), THREADS))


#: CI (``CI=true``, as GitHub Actions and .ci/run set it) provides every tool a test needs, so there a missing
#: tool is a failure: a skip would let the coverage vanish without anyone noticing.
IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_unless_ci(reason: str) -> None:
    """Skip the calling test on a machine that lacks what it needs; fail it in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: .ci/run must provide this)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def aarch64_env():
    """The emulated aarch64 board (see emulated_aarch64_board)."""
    return emulated_aarch64_board()


def emulated_aarch64_board():
    """qemu-user and the cached aarch64 sysroot, installed and built if missing, plus the cross linker (the
    ziglang wheel, a dependency, so never missing). The test skips only on a machine that cannot install
    system packages (not root, no apt-get) and outside CI; any other failure fails it."""
    from graphopt.errors import EmulationError
    from graphopt.targets.aarch64 import emulation, toolchain

    toolchain.ensure_cross_toolchain()
    try:
        return emulation.ensure_aarch64_sysroot()
    except EmulationError as exc:
        reason = toolchain.apt_unavailable_reason()
        if reason is None:
            raise
        skip_unless_ci(f"aarch64 emulation is not set up and cannot be installed here ({reason}): {exc}")


def pytest_collection_modifyitems(config, items):
    # `-m "not emulated"` must deselect every test that starts qemu, so the marker is checked, not trusted.
    unmarked = [item.nodeid for item in items
                if "aarch64_env" in getattr(item, "fixturenames", ()) and item.get_closest_marker("emulated") is None]
    if unmarked:
        raise pytest.UsageError("tests that use the emulated aarch64 board must be marked "
                                f"@pytest.mark.emulated: {', '.join(unmarked)}")


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
