"""Static int8 on models as users bring them: torchvision classifiers and HF encoders.

Each model is built with random weights (nothing is downloaded) and its BatchNorm statistics
measured on random images, as training would leave them: with the default statistics (mean 0,
variance 1) the activations of a deep random network shrink layer after layer until the logits
are rounding noise, and no comparison, int8 or float, means anything on them. Then
``fold,quantize{mode=int8},fuse`` is compiled for this host with 8 calibration samples and
compared with eager float on two held-out samples: cosine >= 0.99 on every output.

The layers the host has no integer kernel for stay in float, each with its reason in the
build's manifest: depthwise and grouped convs and activation x activation matmuls where the
host has a dot-product instruction (VNNI), every layer where it has none (AVX2, the
AVX-VNNI-only tier).

CI compiles four small models at 64x64 and checks the fallback decisions of two depthwise
stacks without building; the whole torchvision classification zoo and the HF encoders run
with ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.passes.quantize.fallback import integer_target
from graphopt.testing import cosine, leaves

MIN_COSINE = 0.99
PIPELINE = "fold,quantize{mode=int8},fuse"
SEED = 0


def _torchvision(name: str, size: int = 64, **kwargs):
    from graphopt.models import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(SEED)
    model = tv.models.get_model(name, weights=None, **kwargs).eval()
    return model, (torch.randn(1, 3, size, size),)


def _hf(config: str, model: str, **config_kwargs):
    import transformers

    torch.manual_seed(SEED)
    cfg = getattr(transformers, config)(return_dict=False, **config_kwargs)
    encoder = getattr(transformers, model)(cfg).eval()
    if "image_size" in config_kwargs:
        return encoder, (torch.randn(1, 3, config_kwargs["image_size"], config_kwargs["image_size"]),)
    return encoder, (torch.randint(0, cfg.vocab_size, (1, 16)),)


_TEXT = dict(vocab_size=1000, max_position_embeddings=64)
HF_ENCODERS = {
    "bert": lambda: _hf("BertConfig", "BertModel", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, **_TEXT),
    "distilbert": lambda: _hf("DistilBertConfig", "DistilBertModel", dim=64, n_layers=2, n_heads=2,
                              hidden_dim=128, **_TEXT),
    "vit": lambda: _hf("ViTConfig", "ViTModel", image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=128),
}
FAST = ["resnet18", "squeezenet1_1", "hf:bert", "hf:distilbert"]
# Below cosine 0.99 with random weights, where the float model itself amplifies a perturbation
# of one int8 step: eager float whose input carries uniform noise of one step (range / 255) is
# at cosine 0.959 (ShuffleNetV2 x0.5), 0.950 (x1.0), 0.974 (MnasNet 0.5), 0.964 (MnasNet 1.0)
# and 0.967 (RegNetY) of clean eager float on the held-out samples. Each int8 build (0.958,
# 0.944, 0.956, 0.898, 0.932) is as far as its own fake-quant graph, so the integer kernels are
# not the cause (benchmarks/quantize_zoo.py prints the three columns side by side).
BELOW_0_99 = ["efficientnet_b0", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "mnasnet0_5", "mnasnet1_0",
              "regnet_y_400mf"]
# sizes and builder arguments where 64x64 is too small or not allowed
_SIZE = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 70}
_KWARGS = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 64},
           "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 70},
           "inception_v3": {"aux_logits": False, "init_weights": False},
           "googlenet": {"aux_logits": False, "init_weights": False}}


def build(name: str):
    if name.startswith("hf:"):
        return HF_ENCODERS[name[3:]]()
    return _torchvision(name, _SIZE.get(name, 64), **_KWARGS.get(name, {}))


def _samples(inputs, count: int, seed: int, batch: int | None = None):
    gen = torch.Generator().manual_seed(seed)

    def like(x):
        shape = (batch or x.shape[0], *x.shape[1:])
        if x.is_floating_point():
            return torch.randn(shape, generator=gen)
        return torch.randint(0, 1000, shape, generator=gen)

    return [tuple(like(x) for x in inputs) for _ in range(count)]


def measure_batchnorm_statistics(model: torch.nn.Module, inputs) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to those of ``model``'s own activations on
    random inputs (a cumulative average over a few batches of 16), then back to eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for batch in _samples(inputs, 4, seed=SEED + 1, batch=16):
            model(*batch)
    return model.eval()


def compile_int8(name: str):
    """(eager model, compiled int8 module, held-out samples) of zoo model ``name``."""
    model, inputs = build(name)
    model = measure_batchnorm_statistics(model, inputs)
    calib = _samples(inputs, 8, seed=SEED + 2)
    module = graphopt.compile(model, "x86", inputs, PIPELINE, calibration_data=calib)
    return model, module, _samples(inputs, 2, seed=SEED + 3)


def min_cosine(model, module, held_out) -> float:
    worst = 1.0
    for sample in held_out:
        with torch.no_grad():
            expected = leaves(model(*sample))
        actual = leaves(module(*sample))
        for e, a in zip(expected, actual):
            if isinstance(e, torch.Tensor) and e.is_floating_point():
                worst = min(worst, cosine(torch.as_tensor(a).flatten().double(), e.flatten().double()))
    return worst


def _check(name: str) -> dict:
    model, module, held_out = compile_int8(name)
    report = module.manifest["quantize"]
    assert len(report["float_why"]) == len(report["float"])
    assert min_cosine(model, module, held_out) >= MIN_COSINE, report
    if integer_target("x86").dot is None:
        # no dot-product instruction: no int8 layer would beat float
        assert report["quantized"] == [] and report["float"]
        assert all(r["reason"].startswith("no int8 dot-product kernel") for r in report["float_why"])
    return report


@pytest.mark.parametrize("name", FAST)
def test_static_int8_on_a_zoo_model_is_within_cosine_0_99_of_float(name):
    report = _check(name)
    if integer_target("x86").dot is None:
        return
    reasons = {r["reason"].split(":")[0] for r in report["float_why"]}
    if name == "resnet18":  # every conv and the fc have 0.5M MACs or more
        assert report["float"] == []
    elif name.startswith("hf:"):  # 16 tokens of width 64: every linear is too small to pay
        assert report["quantized"] == [] and reasons == {"small layer"}
    else:  # squeezenet's small squeeze convs stay float, its expand convs run int8
        assert report["quantized"] and reasons == {"small layer"}


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.xfail(reason="random-weight float models that amplify one step of input noise to cosine < 0.99",
                   strict=False)
@pytest.mark.parametrize("name", BELOW_0_99)
def test_static_int8_on_depthwise_stacks_is_within_cosine_0_99_of_float(name):
    _check(name)


@pytest.mark.parametrize("name,depthwise", [("mobilenet_v3_small", 11), ("shufflenet_v2_x0_5", 19)])
def test_depthwise_convs_stay_float_on_a_vnni_target(name, depthwise):
    # decided from the target alone (x86-avx512 has VNNI), so no build is needed
    model, inputs = build(name)
    graph = graphopt.optimize(model, inputs, "fold,quantize{mode=int8}", calibration_data=_samples(inputs, 2, 1),
                              target="x86-avx512")
    report = graph.annotations["quantize"]
    assert report["quantized"]
    reasons = [r["reason"] for r in report["float_why"]]
    assert reasons.count("depthwise conv: the int8 kernel takes groups=1 only") == depthwise
    assert all(r.startswith(("depthwise conv", "small layer")) for r in reasons)


def test_a_target_without_an_int8_dot_product_keeps_every_layer_in_float():
    # SSE-only x86 has no int8 kernel (AVX2 has vpmaddubsw): the pass decides from the
    # target alone, so this needs no build and runs on any host
    model, inputs = build("resnet18")
    calib = _samples(inputs, 2, seed=SEED + 2)
    sse = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    graph = graphopt.optimize(model, inputs, "fold,quantize{mode=int8}", calibration_data=calib, target=sse)
    report = graph.annotations["quantize"]
    assert report["quantized"] == [] and len(report["float"]) == 21  # 20 convs + fc
    assert {r["reason"] for r in report["float_why"]} == {
        "no int8 dot-product kernel for sse (4 fp32 lanes, 16 vector registers, int8 dot: none): float is faster"}
    # the graph is left as it was: no quantize/dequantize node
    assert not any("quantize" in str(n.target) for n in graph.call_nodes())


def test_without_a_target_every_candidate_is_quantized():
    # optimize() alone builds the target-neutral fake-quant reference
    model, inputs = build("mobilenet_v3_small")
    graph = graphopt.optimize(model, inputs, "fold,quantize{mode=int8}", calibration_data=_samples(inputs, 2, 1))
    assert graph.annotations["quantize"]["float"] == []


def test_fallback_false_quantizes_layers_without_an_integer_kernel():
    model, inputs = build("mobilenet_v3_small")
    graph = graphopt.optimize(model, inputs, "fold,quantize{mode=int8,fallback=false}",
                              calibration_data=_samples(inputs, 2, 1), target="x86-avx2")
    assert graph.annotations["quantize"]["float"] == []


def _zoo_names() -> list[str]:
    from graphopt.models import import_torchvision

    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models)) + [f"hf:{n}" for n in HF_ENCODERS]


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", [n for n in _zoo_names() if n not in FAST + BELOW_0_99])
def test_static_int8_on_the_whole_zoo(name):
    _check(name)
