"""Reference models used across tests, benchmarks and examples, and the digits data set.

* ``mlp()``: 784 -> 128 -> 10;  ``cnn()``: Conv32-Pool-Conv64-Pool-Dense128-Dropout-Dense10 on 3x32x32;
* ``digits_mlp()`` / ``digits_cnn()``: the same shapes for scikit-learn's 8x8 digits (1x8x8 input);
* ``resnet18()`` / ``mobilenet_v2()``: torchvision architectures with random weights;
* ``transformer()``: a 2-layer ``nn.TransformerEncoder`` (d_model 256, 4 heads) on 1x128x256.

``load_digits_split()`` gives scikit-learn's bundled 1,797 handwritten digits (no download)
with a fixed train/test split; ``train_digits(model)`` trains a model on it in seconds.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

SEED = 0


class MLP(nn.Module):
    def __init__(self, in_features: int = 784, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


class SmallCNN(nn.Module):
    """Conv32-Pool-Conv64-Pool-Dense128-Dropout-Dense10."""

    def __init__(self, in_channels: int = 3, image: int = 32, classes: int = 10, batchnorm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64) if batchnorm else nn.Identity()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * (image // 4) ** 2, 128)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.dropout(x))


def _seeded(fn: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(SEED)
    return fn().eval()


def mlp() -> nn.Module:
    return _seeded(MLP)


def cnn() -> nn.Module:
    return _seeded(SmallCNN)


def digits_mlp() -> nn.Module:
    return _seeded(lambda: MLP(64, 128, 10))


def digits_cnn() -> nn.Module:
    return _seeded(lambda: SmallCNN(1, 8, 10, batchnorm=True))


def import_torchvision():
    """Import torchvision even where its compiled ops cannot load.

    The torchvision 0.28 wheel on PyPI is a CUDA build; with the CPU torch its ``_C``
    extension fails to load and ``import torchvision`` then dies registering fake kernels
    for ``torchvision::nms``/``qnms``. Defining those two schemas first lets the pure-Python
    parts (the model architectures we need) import; detection ops stay unavailable.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 - kept alive below
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined by an earlier partial import
            pass
    _KEEP.append(lib)
    return importlib.import_module("torchvision")


_KEEP: list = []


def torchvision_model(name: str) -> nn.Module:
    """A torchvision architecture by name, random weights (no download)."""
    tv = import_torchvision()
    builder = getattr(tv.models, name, None)
    if builder is None or not callable(builder):
        raise ValueError(f"torchvision has no model {name!r}")
    torch.manual_seed(SEED)
    return builder(weights=None).eval()


def resnet18() -> nn.Module:
    return torchvision_model("resnet18")


def mobilenet_v2() -> nn.Module:
    return torchvision_model("mobilenet_v2")


def transformer() -> nn.Module:
    torch.manual_seed(SEED)
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, batch_first=True)
    # enable_nested_tensor only matters for padded batches; off keeps export on the plain path
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


@dataclass(frozen=True)
class Reference:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]

    def example_input(self, batch: int = 1, seed: int = SEED) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input_shape[1:]), generator=g)


REFERENCE_MODELS: dict[str, Reference] = {
    "mlp": Reference("mlp", mlp, (1, 784)),
    "cnn": Reference("cnn", cnn, (1, 3, 32, 32)),
    "resnet18": Reference("resnet18", resnet18, (1, 3, 224, 224)),
    "mobilenet_v2": Reference("mobilenet_v2", mobilenet_v2, (1, 3, 224, 224)),
    "transformer": Reference("transformer", transformer, (1, 128, 256)),
    "digits_mlp": Reference("digits_mlp", digits_mlp, (1, 64)),
    "digits_cnn": Reference("digits_cnn", digits_cnn, (1, 1, 8, 8)),
}


# ------------------------------------------------------------------------ digits data


def load_digits_split(test_size: float = 0.25, image: bool = False):
    """scikit-learn's bundled digits, scaled to [0, 1]: (x_train, y_train, x_test, y_test).

    The split is stratified and seeded, so every test and benchmark sees the same one.
    ``image=True`` shapes inputs as N x 1 x 8 x 8 for the CNN; otherwise N x 64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=SEED, stratify=y)
    if image:
        xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
    return xtr, ytr, xte, yte


def train_digits(model: nn.Module, epochs: int = 30, lr: float = 3e-3, batch: int = 64,
                 image: bool | None = None) -> tuple[nn.Module, float]:
    """Train ``model`` on the digits train split with Adam; returns (model in eval mode, test accuracy)."""
    if image is None:
        image = isinstance(model, SmallCNN)
    xtr, ytr, xte, yte = load_digits_split(image=image)
    torch.manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model, accuracy(model, xte, yte)


def accuracy(model: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out = torch.as_tensor(out)
    return float((out.argmax(-1) == y).float().mean())
