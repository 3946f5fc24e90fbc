"""The model zoo: models as people bring them, from torchvision, timm and HF transformers.

Every entry builds its model from the library's own code with random weights, so nothing is
downloaded (torchvision ``weights=None``, timm ``pretrained=False``, transformers from a
config object), and comes with example inputs small enough for a 2-core CI machine: 64x64
images where the architecture allows any size, sequences of 16 tokens, batch 1. The HF
models use small configs (a few layers of width 64) of the real architectures, and
``return_dict=False`` (or, where that path is broken, a wrapper calling ``to_tuple()``), so
they return plain tuples.

``tests/test_zoo.py`` compiles the ``fast`` entries in CI and the rest under the ``zoo``
marker; ``benchmarks/zoo.py`` runs any selection and prints the pass rate.

timm and transformers are imported only when one of their models is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from graphopt.models import SEED, import_torchvision

FAMILIES = ("torchvision", "timm", "hf")


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: ``build()`` gives the model in eval mode and its example inputs."""

    name: str  # "<family>/<model>", e.g. "timm/resnet18d"
    family: str
    factory: Callable[[], tuple[nn.Module, tuple[Any, ...]]]
    fast: bool = False  # in the subset CI compiles on every run

    def build(self) -> tuple[nn.Module, tuple[Any, ...]]:
        torch.manual_seed(SEED)
        model, inputs = self.factory()
        return model.eval(), inputs


def _image(size: int, channels: int = 3) -> tuple[torch.Tensor]:
    return (torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(SEED)),)


def _tokens(vocab: int, length: int = 16) -> tuple[torch.Tensor]:
    return (torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(SEED)),)


# ---------------------------------------------------------------- torchvision
# Image sizes where 64x64 is too small or not allowed: inception_v3 needs 75x75 (its stem
# leaves nothing smaller), the ViTs and MaxViT take a fixed size (224 unless the builder is
# told another; ViT-H/14's patch of 14 does not divide 64).
_TORCHVISION_SIZE = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 70}
# Builder arguments: the ViTs take their image size as an argument.
_TORCHVISION_KWARGS = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64},
                       "vit_l_16": {"image_size": 64}, "vit_l_32": {"image_size": 64},
                       "vit_h_14": {"image_size": 70}, "inception_v3": {"aux_logits": False, "init_weights": False},
                       "googlenet": {"aux_logits": False, "init_weights": False}}
_TORCHVISION_FAST = {"resnet18", "mobilenet_v3_small", "squeezenet1_1"}


def _torchvision_entry(name: str) -> ZooModel:
    def factory():
        tv = import_torchvision()
        model = tv.models.get_model(name, weights=None, **_TORCHVISION_KWARGS.get(name, {}))
        return model, _image(_TORCHVISION_SIZE.get(name, 64))

    return ZooModel(f"torchvision/{name}", "torchvision", factory, fast=name in _TORCHVISION_FAST)


def torchvision_names() -> list[str]:
    """Every classification model torchvision lists (detection, segmentation, video and
    quantized models live in submodules and are not listed)."""
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


# ---------------------------------------------------------------------- timm
# name -> image size; models with a position embedding or attention bias sized to the image
# take it through ``img_size``, the rest run on any size.
_TIMM = {
    # CNNs
    "resnet18d": 64, "repvgg_a0": 64, "dla34": 64, "regnety_002": 64, "hrnet_w18_small": 64,
    "efficientnet_b0": 64, "rexnet_100": 64, "convnext_atto": 64,
    # mobile nets
    "mobilenetv3_small_100": 64, "ghostnet_100": 64, "lcnet_050": 64, "mobilenetv4_conv_small": 64,
    # ViTs
    "vit_tiny_patch16_224": 64, "deit_tiny_patch16_224": 64, "cait_xxs24_224": 64,
    "swin_tiny_patch4_window7_224": 224, "pvt_v2_b0": 64, "xcit_nano_12_p16_224": 64,
    # hybrids
    "levit_128s": 224, "coat_lite_tiny": 64, "mobilevit_xxs": 64, "efficientformer_l1": 224,
    "edgenext_xx_small": 64, "fastvit_t8": 64, "tiny_vit_5m_224": 224,
    # MLP-mixers and other token mixers
    "mixer_s16_224": 64, "resmlp_12_224": 64, "poolformer_s12": 64,
}
_TIMM_IMG_SIZE_ARG = {"vit_tiny_patch16_224", "deit_tiny_patch16_224", "cait_xxs24_224", "mixer_s16_224",
                      "resmlp_12_224", "xcit_nano_12_p16_224", "coat_lite_tiny"}
_TIMM_FAST = {"vit_tiny_patch16_224", "convnext_atto"}


def _timm_entry(name: str, size: int) -> ZooModel:
    def factory():
        import_torchvision()  # timm imports torchvision, which needs graphopt's shim on the CPU torch
        import timm

        kwargs = {"img_size": size} if name in _TIMM_IMG_SIZE_ARG else {}
        return timm.create_model(name, pretrained=False, **kwargs), _image(size)

    return ZooModel(f"timm/{name}", "timm", factory, fast=name in _TIMM_FAST)


# ------------------------------------------------------------- HF transformers
_VOCAB = 1000
_SMALL_TEXT = dict(vocab_size=_VOCAB, return_dict=False)


def _hf(module: str, config: str, model: str, config_kwargs: dict, inputs: Callable[[], tuple]) -> Callable:
    def factory():
        import_torchvision()  # transformers may import torchvision for its image utilities
        import importlib

        lib = importlib.import_module(module)
        cfg = getattr(lib, config)(**config_kwargs)
        return getattr(lib, model)(cfg), inputs()

    return factory


def _hf_bert():
    return _hf("transformers", "BertConfig", "BertModel",
               dict(_SMALL_TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    max_position_embeddings=64), lambda: _tokens(_VOCAB))


def _hf_distilbert():
    return _hf("transformers", "DistilBertConfig", "DistilBertModel",
               dict(_SMALL_TEXT, dim=64, n_layers=2, n_heads=2, hidden_dim=128, max_position_embeddings=64),
               lambda: _tokens(_VOCAB))


def _hf_roberta():
    return _hf("transformers", "RobertaConfig", "RobertaModel",
               dict(_SMALL_TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    max_position_embeddings=64), lambda: _tokens(_VOCAB))


def _hf_albert():
    return _hf("transformers", "AlbertConfig", "AlbertModel",
               dict(_SMALL_TEXT, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=128, max_position_embeddings=64), lambda: _tokens(_VOCAB))


def _hf_gpt2():
    return _hf("transformers", "GPT2Config", "GPT2Model",
               dict(_SMALL_TEXT, n_embd=64, n_layer=2, n_head=2, n_positions=64, use_cache=False),
               lambda: _tokens(_VOCAB))


_LLAMA = dict(_SMALL_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, use_cache=False)


def _hf_llama():
    return _hf("transformers", "LlamaConfig", "LlamaModel", _LLAMA, lambda: _tokens(_VOCAB))


class LlamaWithStaticCache(nn.Module):
    """A Llama decoder step with a static KV cache held as module state: ``forward(input_ids,
    cache_position)`` gives the last hidden state, reading and writing the cache in place
    (the way a generation loop calls it), starting from an empty cache each call."""

    def __init__(self, max_cache_len: int = 32):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel, StaticCache

        config = LlamaConfig(**dict(_LLAMA, use_cache=True))
        self.model = LlamaModel(config)
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        with torch.no_grad():  # the cache allocates its tensors on first use; export needs them as buffers
            self.model(input_ids=torch.zeros(1, 1, dtype=torch.long), past_key_values=self.cache,
                       cache_position=torch.zeros(1, dtype=torch.long), use_cache=True)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        # The cache reads its tensors through the module: torch.export traces with its own
        # stand-ins for the module's buffers, and a tensor reached around them would be a constant.
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
            layer.cumulative_length = getattr(self, f"cumulative_length_{i}")
        self.cache.reset()  # every call is the first step of a generation: calls do not depend on each other
        out = self.model(input_ids=input_ids, past_key_values=self.cache, cache_position=cache_position,
                         use_cache=True)
        return out[0]


def _hf_llama_static_cache():
    def factory():
        import_torchvision()
        return LlamaWithStaticCache(), (*_tokens(_VOCAB), torch.arange(16))

    return factory


def _hf_t5_encoder():
    return _hf("transformers", "T5Config", "T5EncoderModel",
               dict(_SMALL_TEXT, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4), lambda: _tokens(_VOCAB))


_VISION = dict(return_dict=False, image_size=64, num_channels=3)


def _hf_vit():
    return _hf("transformers", "ViTConfig", "ViTModel",
               dict(_VISION, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=128), lambda: _image(64))


def _hf_deit():
    return _hf("transformers", "DeiTConfig", "DeiTModel",
               dict(_VISION, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=128), lambda: _image(64))


class TupleOutputs(nn.Module):
    """``model``'s ModelOutput as the tuple of its fields (``to_tuple()``): for the HF vision
    models whose ``return_dict=False`` path is broken in transformers 5."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> tuple:
        return self.model(*args).to_tuple()


def _hf_tuple(*args) -> Callable:
    factory = _hf(*args)
    return lambda: (lambda model, inputs: (TupleOutputs(model), inputs))(*factory())


def _hf_swin():
    return _hf_tuple("transformers", "SwinConfig", "SwinModel",
                     dict(_VISION, return_dict=True, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                          window_size=4), lambda: _image(64))


def _hf_convnext():
    return _hf_tuple("transformers", "ConvNextConfig", "ConvNextModel",
                     dict(num_channels=3, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
                     lambda: _image(64))


def _hf_whisper_encoder():
    # the encoder takes exactly 2 * max_source_positions mel frames
    return _hf("transformers.models.whisper.modeling_whisper", "WhisperConfig", "WhisperEncoder",
               dict(return_dict=False, d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                    num_mel_bins=16, max_source_positions=16, vocab_size=_VOCAB),
               lambda: (torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(SEED)),))


_HF = {
    "bert": (_hf_bert, True), "distilbert": (_hf_distilbert, True), "roberta": (_hf_roberta, False),
    "albert": (_hf_albert, False), "gpt2": (_hf_gpt2, True), "llama": (_hf_llama, True),
    "llama_static_cache": (_hf_llama_static_cache, False), "t5_encoder": (_hf_t5_encoder, True),
    "vit": (_hf_vit, True), "deit": (_hf_deit, False), "swin": (_hf_swin, False),
    "convnext": (_hf_convnext, False), "whisper_encoder": (_hf_whisper_encoder, False),
}


# ----------------------------------------------------------------------- all
def zoo(families: tuple[str, ...] = FAMILIES) -> list[ZooModel]:
    """The zoo's entries of ``families``, in a stable order (family, then name)."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown zoo families {unknown}; valid: {', '.join(FAMILIES)}")
    entries: list[ZooModel] = []
    if "torchvision" in families:
        entries += [_torchvision_entry(n) for n in torchvision_names()]
    if "timm" in families:
        entries += [_timm_entry(n, size) for n, size in sorted(_TIMM.items())]
    if "hf" in families:
        entries += [ZooModel(f"hf/{n}", "hf", make(), fast=fast) for n, (make, fast) in sorted(_HF.items())]
    return entries


def zoo_model(name: str) -> ZooModel:
    """The entry called ``name`` ("timm/resnet18d"); ValueError listing near names otherwise."""
    family = name.split("/", 1)[0]
    entries = zoo((family,)) if family in FAMILIES else zoo()
    for entry in entries:
        if entry.name == name:
            return entry
    near = [e.name for e in entries if name.split("/")[-1] in e.name][:10]
    raise ValueError(f"no zoo model {name!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))
