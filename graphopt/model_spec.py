"""Resolve the MODEL argument of the CLI into a module and example inputs.

Accepted spellings:

* ``path/to/file.py:factory`` — ``factory()`` returns a module, or ``(module, example_inputs)``;
* ``torchvision:resnet18`` or a bare torchvision architecture name (random weights);
* a reference model name from graphopt.models (``mlp``, ``cnn``, ``transformer``, ...).

``--input-shape 1,3,224,224`` (repeatable) overrides or supplies the example inputs.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import torch

from graphopt.errors import CaptureError
from graphopt.models import REFERENCE_MODELS, SEED, torchvision_model


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in re.split(r"[,x]", text.strip()))
    except ValueError:
        raise CaptureError(f"bad input shape {text!r}: expected comma-separated integers like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise CaptureError(f"bad input shape {text!r}: dimensions must be positive")
    return dims


def _random_inputs(shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(SEED)
    return tuple(torch.randn(s, generator=g) for s in shapes)


def load_model(spec: str, input_shapes: list[str] | None = None
               ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], str]:
    """(module in eval mode, example inputs, a short name) for a MODEL argument."""
    shapes = [parse_shape(s) for s in input_shapes or []]
    if ".py:" in spec:
        path, _, factory = spec.rpartition(":")
        model, inputs = _from_file(path, factory)
        name = factory
    else:
        name = spec.removeprefix("torchvision:")
        if name in REFERENCE_MODELS and not spec.startswith("torchvision:"):
            ref = REFERENCE_MODELS[name]
            model, inputs = ref.build(), (ref.example_input(),)
        else:
            try:
                model = torchvision_model(name)
            except ValueError:
                valid = ", ".join(REFERENCE_MODELS)
                raise CaptureError(f"unknown model {spec!r}: use FILE.py:FACTORY, torchvision:NAME, or one of "
                                   f"{valid}") from None
            inputs = (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(SEED)),)
    if shapes:
        inputs = _random_inputs(shapes)
    if inputs is None:
        raise CaptureError(f"{spec}: the factory returned no example inputs; pass --input-shape")
    return model.eval(), inputs, name


def _from_file(path: str, factory: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
    if not os.path.isfile(path):
        raise CaptureError(f"model file {path!r} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"graphopt_user_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report what failed there
        raise CaptureError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if fn is None:
        raise CaptureError(f"{path} has no {factory!r}")
    result: Any = fn() if callable(fn) and not isinstance(fn, torch.nn.Module) else fn
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        model, inputs = result
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        return model, inputs
    if isinstance(result, torch.nn.Module):
        return result, None
    raise CaptureError(f"{path}:{factory} returned {type(result).__name__}; expected a torch.nn.Module "
                       "or (module, example_inputs)")
