"""Weight sparsity: the least important weights of linear and conv layers become exact zeros.

* masks.py: the patterns (unstructured, RxC blocks, N:M) over a weight's matrix view, and
  the keep-masks they give;
* selection.py: which weights qualify (linear, conv; not depthwise, not shared) and their
  magnitude or Taylor scores;
* sparsify_pass.py: the registered ``sparsify`` pass and the ``graph.annotations["sparsity"]``
  record the backend and ``graphopt inspect`` read.
"""

from graphopt.passes.sparsify.sparsify_pass import Sparsify  # noqa: F401
