"""Structured pruning across the torchvision classification zoo.

Every model is pruned at 30 % and 50 % of its prunable units: the pruned graph must be
valid, smaller in both parameters and FLOPs, report every channel group as pruned or kept
(with why), and compile for x86 to a module that matches the eager pruned graph on the
fp32 rung. The fast subset covers the structures pruning has to see through: channel
shuffle and split (ShuffleNetV2), fire-module concats (SqueezeNet), squeeze-excitation
gates on depthwise-separable stacks (MobileNetV3), grouped convs with groups != channels
plus SE (RegNetY), dense concat chains (DenseNet) and patch embedding with multi-head
attention (ViT). The whole list runs under the ``zoo`` marker. The zoo's small HF
transformers check heads and FFN pruning: BERT (multi-head attention), GPT-2 (``Conv1D``
layers, i.e. addmm with transposed weights) and Llama (rotary embeddings, grouped-query
attention: a unit is one key/value head with the query heads sharing it).
"""

from __future__ import annotations

import functools

import pytest
import torch

import graphopt
from graphopt.testing import assert_close
from graphopt.zoo import torchvision_names, zoo_model

FAST = ["shufflenet_v2_x0_5", "squeezenet1_0", "mobilenet_v3_small", "regnet_y_400mf", "densenet121", "vit_b_16"]
RATIOS = [0.3, 0.5]
# Too large for a 64x64 run on a CI machine within the test timeout.
TOO_LARGE = {"vit_h_14", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf", "vit_l_16", "vit_l_32"}


@functools.lru_cache(maxsize=2)
def captured(name: str) -> tuple[graphopt.Graph, tuple[torch.Tensor, ...]]:
    model, inputs = zoo_model(name if "/" in name else f"torchvision/{name}").build()
    return graphopt.capture(model, *inputs), inputs


def prune_and_check(name: str, ratio: float) -> None:
    compiled_matches_eager(*pruned_checked(name, ratio))


def pruned_checked(name: str, ratio: float) -> tuple[graphopt.Graph, tuple[torch.Tensor, ...]]:
    graph, inputs = captured(name)
    pruned = graphopt.optimize(graph, pipeline=f"fold,prune{{ratio={ratio}}}")
    pruned.check()

    before, after = graph.summary(), pruned.summary()
    assert after.params < before.params and after.flops < before.flops, (before, after)

    report = pruned.annotations["prune_report"]
    assert any(row["status"] == "pruned" for row in report)
    for row in report:
        assert row["status"] in ("pruned", "kept")
        assert row["channels_after"] <= row["channels_before"]
        assert (row["status"] == "kept") == (row["channels_after"] == row["channels_before"])
        assert row["status"] == "pruned" or row["reason"], row

    assert all(torch.isfinite(t).all() for t in pruned(*inputs))
    return pruned, inputs


def compiled_matches_eager(pruned: graphopt.Graph, inputs: tuple[torch.Tensor, ...]) -> None:
    eager = pruned(*inputs)
    compiled = graphopt.compile(pruned, "x86")
    assert_close(compiled(*inputs), eager[0] if len(eager) == 1 else eager, "algebraic")


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", FAST)
def test_pruned_model_is_smaller_valid_and_compiles_to_the_same_outputs(name, ratio):
    prune_and_check(name, ratio)


@pytest.mark.parametrize("name", ["hf/bert", "hf/gpt2", "hf/llama"])
def test_transformer_heads_and_ffn_prune_and_compile_to_the_same_outputs(name):
    pruned, inputs = pruned_checked(name, 0.5)
    report = pruned.annotations["prune_report"]
    attention = [r for r in report if any("attn" in layer or "attention" in layer for layer in r["layers"])]
    assert any(r["status"] == "pruned" for r in attention), report
    compiled_matches_eager(pruned, inputs)


@pytest.mark.zoo
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", [n for n in torchvision_names() if n not in FAST and n not in TOO_LARGE])
def test_every_torchvision_classifier_prunes(name, ratio):
    prune_and_check(name, ratio)
