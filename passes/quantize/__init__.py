"""Quantization: the ``quantize`` pass, calibration observers and the QDQ graph form.

* observers.py — range observers (minmax, percentile, entropy/KL, mse);
* calibrate.py — run the float graph on data, store ``node.meta["qrange"]``;
* qdq.py — which ops are quantizable and how QDQ nodes are inserted;
* sensitivity.py — accuracy-aware selection of layers kept in float;
* quantize_pass.py — the registered ``quantize`` pass (``pass`` is a Python keyword).

The integer lowering of the QDQ form lives with the backend: targets/frontend/quantized.py.
"""

from graphopt.passes.quantize.calibration import calibrate  # noqa: F401
from graphopt.passes.quantize.quantize_pass import Quantize  # noqa: F401
