"""Built-in passes. Importing this package registers them (see graphopt.passes_base)."""

from graphopt.passes import cse, dce, fold, fold_batchnorm, fold_constants, noop  # noqa: F401
from graphopt.passes import quantize  # noqa: F401,E402
from graphopt.passes import fuse  # noqa: F401,E402
from graphopt.passes import prune  # noqa: F401,E402
from graphopt.passes import sparsify  # noqa: F401,E402
