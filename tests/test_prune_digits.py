"""Real accuracy on real data: prune half of the digits models, recover by distillation.

scikit-learn's bundled 8x8 handwritten digits (1,797 images, fixed split and seed). The
pruned and fine-tuned model must stay within 1.0 accuracy point of the unpruned one.
"""

from __future__ import annotations

import pytest
import torch

import graphopt
import graphopt.models as models


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: more threads only add contention on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name, image", [("digits_mlp", False), ("digits_cnn", True)])
def test_half_pruned_digits_model_recovers_within_one_point(name, image):
    model, _ = models.train_digits(getattr(models, name)(), epochs=30)
    xtr, ytr, xte, yte = models.load_digits_split(image=image)
    baseline = models.accuracy(model, xte, yte)
    graph = graphopt.capture(model, xte[:8], dynamic_shapes="batch")
    pruned = graphopt.optimize(graph, pipeline="prune{ratio=0.5}")
    assert pruned.summary().params < 0.55 * graph.summary().params

    tuned = graphopt.finetune(pruned, (xtr, ytr), teacher=model, epochs=20, lr=2e-3, distill=True,
                              temperature=4.0, alpha=0.7, progress=False)
    assert tuned is pruned
    assert all(not t.requires_grad for t in tuned.constants().values())  # left frozen
    tuned.check()
    acc = models.accuracy(tuned, xte, yte)
    assert baseline > 0.95
    assert acc >= baseline - 0.010, f"{name}: pruned+finetuned {acc:.4f} vs unpruned {baseline:.4f}"


def test_finetune_rejects_bad_arguments():
    graph = graphopt.capture(models.digits_mlp(), torch.randn(2, 64))
    with pytest.raises(graphopt.errors.InputError, match="alpha"):
        graphopt.finetune(graph, (torch.randn(4, 64), torch.zeros(4, dtype=torch.long)), alpha=2.0)
    with pytest.raises(graphopt.errors.InputError, match="4 inputs but 3 labels"):
        graphopt.finetune(graph, (torch.randn(4, 64), torch.zeros(3, dtype=torch.long)))
