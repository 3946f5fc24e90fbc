"""A compiled model keeps the model's interface.

Specification:

* outputs come back with the model's structure — a tensor, a tuple, a list, a dict, nested
  containers, a dataclass — from ``graphopt.compile``'s module, from an artifact loaded from
  disk, and from an ``optimize``d graph called with :meth:`Graph.forward`; a container class
  the loading process cannot import comes back as a dict with the same keys;
* keyword inputs given at capture (``example_kwargs``) are keywords of the compiled module,
  in any order; a missing or unexpected keyword is an InputError naming it;
* ``dynamic_shapes`` takes torch.export's own spec: a dim marked ``Dim("seq", max=...)`` is
  symbolic in the build, one module serves every size in its range (matching eager), and
  a size outside the range is an InputError.
"""

import dataclasses
import json
import os

import pytest
import torch
from torch.export import Dim

import graphopt
from graphopt.errors import InputError
from graphopt.testing import assert_matches_eager


class NestedOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, scale):
        h = torch.tanh(self.proj(x)) * scale
        return {"hidden": h, "extras": (h.sum(-1), [h * 2, h + 1])}


@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    pooled: torch.Tensor


torch.export.register_dataclass(EncoderOutput, serialized_type_name="tests.test_interfaces.EncoderOutput")


class DataclassOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.proj(x))
        return EncoderOutput(last_hidden_state=h, pooled=h.mean(1))


class TinyEncoder(torch.nn.Module):
    """One pre-norm transformer encoder layer over token ids, with a padding mask."""

    def __init__(self, vocab=50, dim=32, heads=2, max_len=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(max_len, dim) * 0.1)
        self.layer = torch.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0,
                                                      batch_first=True, norm_first=True)
        self.heads = heads

    def forward(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos[:seq]
        # additive mask: padded keys get -inf-like scores for every query
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        bias = bias.expand(-1, self.heads, seq, -1).reshape(-1, seq, seq)
        h = self.layer.self_attn(self.layer.norm1(x), self.layer.norm1(x), self.layer.norm1(x),
                                 attn_mask=bias, need_weights=False)[0]
        x = x + h
        x = x + self.layer.linear2(torch.relu(self.layer.linear1(self.layer.norm2(x))))
        return {"last_hidden_state": x, "pooled": x[:, 0]}


class WithKeywords(torch.nn.Module):
    """``model`` called with fixed keyword inputs: the eager reference of a keyword call."""

    def __init__(self, model, **kwargs):
        super().__init__()
        self.model, self.kwargs = model, kwargs

    def forward(self, *args):
        return self.model(*args, **self.kwargs)


def _x():
    return torch.randn(3, 8)


# ------------------------------------------------------------------ outputs
def test_nested_dict_tuple_list_outputs_keep_their_structure_in_memory_and_on_disk(tmp_path):
    model, x, scale = NestedOutputs().eval(), _x(), torch.tensor(0.5)
    module = graphopt.compile(model, "x86", (x, scale), pipeline="fold")
    out = module(x, scale)
    assert isinstance(out, dict) and list(out) == ["hidden", "extras"]
    assert isinstance(out["extras"], tuple) and isinstance(out["extras"][1], list)
    assert_matches_eager(out, model, (x, scale))

    loaded = graphopt.load(module.save(str(tmp_path / "nested")))
    assert_matches_eager(loaded(x, scale), model, (x, scale))


def test_optimized_graph_called_as_the_model_returns_the_model_structure():
    model, x, scale = NestedOutputs().eval(), _x(), torch.tensor(0.5)
    graph = graphopt.optimize(model, (x, scale), "fold")
    assert_matches_eager(graph.forward(x, scale), model, (x, scale))
    assert len(graph(x, scale)) == 4  # the flat form passes and verification compare


def test_dataclass_output_is_rebuilt_as_the_dataclass(tmp_path):
    model, x = DataclassOutputs().eval(), _x()
    module = graphopt.compile(model, "x86", (x,), pipeline="fold")
    out = module(x)
    assert isinstance(out, EncoderOutput)
    assert_matches_eager(out, model, (x,))
    loaded = graphopt.load(module.save(str(tmp_path / "dc")))
    assert isinstance(loaded(x), EncoderOutput)
    assert_matches_eager(loaded(x), model, (x,))


def test_an_output_class_missing_at_load_comes_back_as_a_dict_with_its_keys(tmp_path):
    model, x = DataclassOutputs().eval(), _x()
    path = graphopt.compile(model, "x86", (x,), pipeline="fold").save(str(tmp_path / "gone"))
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    # as if the class lived in a package the loading process does not have
    manifest["output_spec"][1]["type"] = "package_not_installed.outputs.EncoderOutput"
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    out = graphopt.load(path)(x)
    assert type(out) is dict and list(out) == ["last_hidden_state", "pooled"]
    with torch.no_grad():
        ref = model(x)
    assert_matches_eager(EncoderOutput(**out), model, (x,))
    assert out["pooled"].shape == ref.pooled.shape


def test_a_model_returning_one_tensor_returns_one_tensor():
    model, x = torch.nn.Linear(8, 4).eval(), _x()
    out = graphopt.compile(model, "x86", (x,), pipeline="fold")(x)
    assert isinstance(out, torch.Tensor)
    assert_matches_eager(out, model, (x,))


# ------------------------------------------------------------------- keywords
class MaskedSum(torch.nn.Module):
    def forward(self, x, mask=None, bias=None):
        return (x * mask).sum(-1) + bias


def test_keyword_inputs_are_keywords_of_the_compiled_module_in_any_order(tmp_path):
    model = MaskedSum()
    x, mask, bias = torch.randn(2, 5), (torch.rand(2, 5) > 0.5).float(), torch.randn(2)
    module = graphopt.compile(model, "x86", (x,), pipeline="fold", example_kwargs={"mask": mask, "bias": bias})
    assert [s.name for s in module.inputs] == ["x", "mask", "bias"]
    reference = WithKeywords(model, mask=mask, bias=bias)
    assert_matches_eager(module(x, bias=bias, mask=mask), reference, (x,))
    loaded = graphopt.load(module.save(str(tmp_path / "kw")))
    assert_matches_eager(loaded(x, mask=mask, bias=bias), reference, (x,))


def test_a_missing_or_unexpected_keyword_is_an_input_error_naming_it():
    x, mask, bias = torch.randn(2, 5), torch.ones(2, 5), torch.randn(2)
    module = graphopt.compile(MaskedSum(), "x86", (x,), pipeline="fold",
                              example_kwargs={"mask": mask, "bias": bias})
    with pytest.raises(InputError, match="missing keyword input.*bias"):
        module(x, mask=mask)
    with pytest.raises(InputError, match="unexpected keyword input.*weights"):
        module(x, mask=mask, bias=bias, weights=bias)
    with pytest.raises(InputError, match="positional"):
        module(x, mask, mask=mask, bias=bias)


# --------------------------------------------------------------- dynamic dims
@pytest.fixture(scope="module")
def encoder_module():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    ids, mask = torch.randint(0, 50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    seq = Dim("seq", max=64)
    module = graphopt.compile(model, "x86", (ids,), example_kwargs={"attention_mask": mask},
                              dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    return model, module


def _tokens(batch, n):
    ids = torch.randint(0, 50, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[0, n - n // 3:] = 0  # the first sequence is padded
    return ids, mask


def test_a_dynamic_sequence_dim_is_symbolic_and_named_in_the_manifest(encoder_module):
    _, module = encoder_module
    assert [s.shape for s in module.inputs] == [(2, "seq"), (2, "seq")]
    assert module.manifest["dim_ranges"] == {"seq": [0, 64]}


@pytest.mark.parametrize("n", [3, 9, 40, 64])
def test_one_encoder_build_serves_every_sequence_length_with_a_padding_mask(encoder_module, n):
    model, module = encoder_module
    ids, mask = _tokens(2, n)
    out = module(ids, attention_mask=mask)
    assert out["last_hidden_state"].shape == (2, n, 32)
    assert_matches_eager(out, WithKeywords(model, attention_mask=mask), (ids,))


def test_a_sequence_longer_than_the_captured_range_is_an_input_error(encoder_module, tmp_path):
    _, module = encoder_module
    ids, mask = _tokens(2, 65)
    with pytest.raises(InputError, match=r"dimension seq is 65, outside the range \[0, 64\]"):
        module(ids, attention_mask=mask)
    loaded = graphopt.load(module.save(str(tmp_path / "enc")))
    with pytest.raises(InputError, match="outside the range"):
        loaded(ids, attention_mask=mask)
    ids, mask = _tokens(2, 17)
    assert loaded(ids, attention_mask=mask)["pooled"].shape == (2, 32)


def test_inputs_sharing_a_dynamic_dim_must_agree_on_its_size(encoder_module):
    _, module = encoder_module
    ids, _ = _tokens(2, 10)
    _, mask = _tokens(2, 12)
    with pytest.raises(InputError, match="dimension seq is 12 here but 10"):
        module(ids, attention_mask=mask)


# ----------------------------------------------------------------- HF BERT
@pytest.fixture(scope="module")
def bert_module():
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    from graphopt.models import import_torchvision

    import_torchvision()  # transformers imports torchvision, whose CUDA wheel needs graphopt's shim on CPU torch
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=512)
    model = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 1000, (1, 17)), torch.ones(1, 17, dtype=torch.long)
    seq = Dim("seq", max=512)
    module = graphopt.compile(model, "x86", (ids,), example_kwargs={"attention_mask": mask},
                              dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    return model, module


@pytest.mark.parametrize("n", [17, 128, 500])
def test_bert_compiled_once_serves_any_sequence_length_with_an_attention_mask(bert_module, n):
    model, module = bert_module
    ids, mask = torch.randint(0, 1000, (1, n)), torch.ones(1, n, dtype=torch.long)
    out = module(ids, attention_mask=mask)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert out.last_hidden_state.shape == (1, n, 64)
    assert_matches_eager(out, WithKeywords(model, attention_mask=mask), (ids,))


def test_bert_with_a_padded_attention_mask_matches_eager(bert_module):
    model, module = bert_module
    ids, mask = torch.randint(0, 1000, (1, 17)), torch.ones(1, 17, dtype=torch.long)
    mask[0, 13:] = 0
    assert_matches_eager(module(ids, attention_mask=mask), WithKeywords(model, attention_mask=mask), (ids,))
