"""Dynamic batch: one artifact compiled with ``dynamic_shapes="batch"`` serves every batch size.

Specification: dimension 0 of each input becomes a symbolic TIR variable through capture,
the passes and TVM; the compiled module (and the artifact reloaded from disk) matches eager
PyTorch at batch 1, 3 and 8; a wrong rank, a wrong non-batch dimension or a size outside
the range the dim was captured for is an InputError at call time that names the input and
the dimension.
"""

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import InputError
from graphopt.models import REFERENCE_MODELS, cnn, mlp
from graphopt.testing import assert_matches_eager

BATCHES = (1, 3, 8)


@pytest.fixture(scope="module")
def mlp_module():
    model = mlp()
    return model, graphopt.compile(model, "x86", (torch.randn(2, 784),), dynamic_shapes="batch")


@pytest.fixture(scope="module")
def cnn_module():
    model = cnn()
    # the default pipeline: fold, then graphopt fusion, whose kernels take the symbolic flatten size
    return model, graphopt.compile(model, "x86", (torch.randn(2, 3, 32, 32),), dynamic_shapes="batch")


def test_batch_dimension_is_named_batch_in_the_manifest(mlp_module, cnn_module):
    for _, module in (mlp_module, cnn_module):
        (spec,) = module.inputs
        assert spec.shape[0] == "batch"  # the user's name for the dim, not torch's symbol ("s31")
        assert all(isinstance(d, int) for d in spec.shape[1:])
        assert [s["shape"][0] for s in module.manifest["inputs"] + module.manifest["outputs"]] == ["batch", "batch"]


def test_a_user_named_dim_keeps_its_name():
    model = mlp()
    rows = torch.export.Dim("rows", min=1, max=64)
    graph = graphopt.capture(model, (torch.randn(2, 784),), dynamic_shapes=({0: rows},))
    optimized = graphopt.optimize(graph, (torch.randn(2, 784),), "fold,fuse")
    assert optimized.input_specs[0].shape == ("rows", 784)
    assert optimized.output_specs[0].shape == ("rows", 10)


def test_passes_do_not_specialize_the_dynamic_batch():
    # fusion's cost model reads int(numel) of symbolic tensors; that must not turn batch into 2
    graph = graphopt.capture(cnn(), (torch.randn(2, 3, 32, 32),), dynamic_shapes="batch")
    optimized = graphopt.optimize(graph, (torch.randn(2, 3, 32, 32),), "fold,fuse")
    for g in (graph, optimized):
        assert g.input_specs[0].shape == ("batch", 3, 32, 32)
        assert g.output_specs[0].shape == ("batch", 10)


@pytest.mark.parametrize("batch", BATCHES)
def test_mlp_serves_every_batch(mlp_module, batch):
    model, module = mlp_module
    x = torch.randn(batch, 784)
    assert_matches_eager(module(x), model, (x,))


@pytest.mark.parametrize("batch", BATCHES)
def test_cnn_serves_every_batch(cnn_module, batch):
    model, module = cnn_module
    x = torch.randn(batch, 3, 32, 32)
    assert_matches_eager(module(x), model, (x,))


def test_saved_artifact_keeps_the_dynamic_batch(cnn_module, tmp_path):
    model, module = cnn_module
    loaded = graphopt.load(module.save(str(tmp_path / "cnn")))
    for batch in (1, 8):
        x = torch.randn(batch, 3, 32, 32)
        assert_matches_eager(loaded(x), model, (x,))


def test_wrong_rank_is_an_input_error(cnn_module):
    _, module = cnn_module
    with pytest.raises(InputError, match=r"expected rank 4 \(shape \(batch, 3, 32, 32\) where batch can be "
                                         r"any size\), got rank 3"):
        module(torch.randn(3, 32, 32))


def test_wrong_non_batch_dimension_is_an_input_error(cnn_module, mlp_module):
    _, module = cnn_module
    with pytest.raises(InputError, match=r"expected shape \(batch, 3, 32, 32\) .*dimension 3 must be 32"):
        module(torch.randn(4, 3, 32, 33))
    _, module = mlp_module
    with pytest.raises(InputError, match=r"dimension 1 must be 784"):
        module(torch.randn(4, 785))


def test_wrong_dtype_is_an_input_error(mlp_module):
    _, module = mlp_module
    with pytest.raises(InputError, match="dtype"):
        module(torch.randn(3, 784, dtype=torch.float64))


def test_the_kernel_of_a_symbolic_flatten_takes_the_batch_as_a_shape_parameter():
    # the flatten (batch*128, 256) of the transformer's attention defines no "batch": the
    # kernel reading it gets the size through an R.Shape parameter instead of erasing shapes
    from graphopt.targets.frontend.lower import lower_to_relax
    from tvm import relax

    model = REFERENCE_MODELS["transformer"].build()
    graph = graphopt.capture(model, (torch.randn(2, 128, 256),), dynamic_shapes="batch")
    mod = lower_to_relax(graphopt.optimize(graph, (torch.randn(2, 128, 256),), "fold,fuse"))
    kernels = [f for gv, f in mod.functions.items() if gv.name_hint != "main" and isinstance(f, relax.Function)]
    assert any(isinstance(p.ty, relax.ShapeType) for f in kernels for p in f.params)
    for f in kernels:  # every kernel output keeps a known shape
        assert not isinstance(f.ret_ty, relax.TensorType) or f.ret_ty.shape is not None, f


@pytest.mark.parametrize("batch", BATCHES)
def test_cnn_with_the_default_pipeline_serves_every_batch(cnn_module, batch):
    model, module = cnn_module
    assert module.manifest["pipeline"] != "fold" and module.manifest["fusion"] == "graph"
    x = torch.randn(batch, 3, 32, 32)
    assert_matches_eager(module(x), model, (x,))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["transformer", "mobilenet_v2", "resnet18"])
def test_reference_models_with_the_default_pipeline_serve_every_batch(name):
    ref = REFERENCE_MODELS[name]
    model = ref.build()
    module = graphopt.compile(model, "x86", (ref.example_input(batch=2),), dynamic_shapes="batch")
    assert module.inputs[0].shape[0] == "batch"
    for batch in BATCHES:
        x = ref.example_input(batch=batch)
        assert_matches_eager(module(x), model, (x,))


def test_a_batch_outside_the_captured_range_is_an_input_error(mlp_module, tmp_path):
    _, module = mlp_module
    assert module.manifest["dim_ranges"] == {"batch": [1, 4096]}
    loaded = graphopt.load(module.save(str(tmp_path / "mlp")))
    for m in (module, loaded):
        with pytest.raises(InputError, match=r"dimension batch is 4097, outside the range \[1, 4096\]"):
            m(torch.randn(4097, 784))
        with pytest.raises(InputError, match=r"dimension batch is 0, outside the range"):
            m(torch.randn(0, 784))


def test_a_user_dim_range_is_enforced_by_the_graph_and_the_module():
    model = mlp()
    rows = torch.export.Dim("rows", min=2, max=16)
    graph = graphopt.capture(model, (torch.randn(4, 784),), dynamic_shapes=({0: rows},))
    assert graph.dim_ranges == {"rows": (2, 16)}
    module = graphopt.compile(graph, "x86", pipeline="fold")
    x = torch.randn(16, 784)
    assert_matches_eager(module(x), model, (x,))
    for run in (graph, module):
        for rows_given in (1, 17):
            with pytest.raises(InputError, match=rf"dimension rows is {rows_given}, outside the range \[2, 16\]"):
                run(torch.randn(rows_given, 784))
    with pytest.raises(InputError, match=r"dimension rows is 17, outside the range \[2, 16\]"):
        module(np.zeros((17, 784), np.float32))  # numpy inputs take the same check
