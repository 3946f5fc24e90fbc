"""graphopt: a compiler-style graph optimizer for PyTorch models, built on torch.export and Apache TVM.

    import graphopt
    m = graphopt.compile(model, "x86", example_inputs=(x,), pipeline="fold")
    y = m(x)
    m.save("out"); graphopt.load("out")(x)

See README.md for the manual and docs/ARCHITECTURE.md for a map of the code.
"""

__version__ = "0.1.0"

from graphopt import errors  # noqa: E402
from graphopt.api import compile, optimize  # noqa: E402,A004
from graphopt.artifact import CompiledModule, load  # noqa: E402
from graphopt.bisect import bisect  # noqa: E402
from graphopt.calibrate import calibrate  # noqa: E402
from graphopt.capture import capture  # noqa: E402
from graphopt.exploration import explore  # noqa: E402
from graphopt.finetune import finetune  # noqa: E402
from graphopt.graph import Graph  # noqa: E402
from graphopt.summary import GraphSummary  # noqa: E402
from graphopt.passes_base import GraphPass, PassResult, option, register_pass  # noqa: E402
from graphopt.pipeline import Pipeline  # noqa: E402
from graphopt.targets.tuning.tuner import RPC, Tune  # noqa: E402

__all__ = ["capture", "optimize", "compile", "load", "calibrate", "finetune", "bisect", "explore", "Tune", "RPC",
           "Graph",
           "GraphSummary", "Pipeline", "GraphPass", "PassResult", "option", "register_pass", "CompiledModule",
           "errors", "__version__"]
