"""Calibration and fine-tuning take batches of any size, whatever batch the graph was captured with.

A graph captured with a static batch runs only that batch; the data users bring comes in the
batch size of their DataLoader. Re-cutting the samples must give the same ranges and the same
gradients as running the whole data set at once.
"""

from __future__ import annotations

import torch

import graphopt
from graphopt.capture import capture
from graphopt.data import exact_chunks
from graphopt.finetune import trainable_constants
from graphopt.testing import assert_close


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.reshape(x.shape[0], -1))  # export bakes a static batch into this reshape


def _data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_exact_chunks_fill_the_last_chunk_with_real_rows_and_count_them():
    x = torch.arange(7.0).reshape(7, 1)
    chunks = exact_chunks((x,), 3)
    assert [real for _c, real in chunks] == [3, 3, 1]
    assert all(c[0].shape == (3, 1) for c, _real in chunks)
    assert chunks[-1][0][0].flatten().tolist() == [6.0, 6.0, 6.0]


def test_calibration_of_a_static_batch_graph_accepts_any_batch_size_and_gives_the_whole_data_ranges():
    x, y = _data(9)
    static = capture(SmallCNN().eval(), (x[:4],))  # batch 4 baked in
    dynamic = capture(SmallCNN().eval(), (x[:4],), dynamic_shapes="batch")
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]  # (x, label) pairs of batch 6 and 3, as a DataLoader gives
    ranges = graphopt.calibrate(static, loader, progress=False)
    whole = graphopt.calibrate(dynamic, [x], progress=False)
    assert ranges and ranges.keys() == whole.keys()
    for name, (lo, hi) in whole.items():
        assert ranges[name] == (lo, hi), name


def test_static_int8_quantizes_with_calibration_batches_of_another_size():
    x, _y = _data(10)
    graph = graphopt.optimize(SmallCNN().eval(), (x[:1],), "fold,quantize{mode=int8}",
                              calibration_data=[x[:7], x[7:]])
    quantized = [n for n in graph.nodes if "quantize_per_tensor" in str(n.target)]
    assert quantized, "no activation was quantized"
    assert_close(graph(x[:1]), SmallCNN().eval()(x[:1]), "int8")  # SQNR against float


def test_finetune_of_a_static_batch_graph_follows_the_full_batch_gradient():
    x, y = _data(13)
    at_batch_1 = capture(SmallCNN().eval(), (x[:1],))
    at_any_batch = capture(SmallCNN().eval(), (x[:2],), dynamic_shapes="batch")
    for graph in (at_batch_1, at_any_batch):
        graphopt.finetune(graph, (x, y), epochs=2, batch_size=8, lr=1e-2, progress=False)
    trained_1, trained_any = trainable_constants(at_batch_1), trainable_constants(at_any_batch)
    assert len(trained_1) == len(trained_any) == 4
    assert_close(tuple(trained_1), tuple(trained_any))  # algebraic: the same sums, in another order
    before = trainable_constants(capture(SmallCNN().eval(), (x[:1],)))
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(trained_1, before))  # it did train
