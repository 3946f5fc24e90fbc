"""Hand a depthwise conv its input channel-blocked (NCHW[L]c) straight from the kernel
that produces it.

Activations are NCHW everywhere else, but a depthwise conv wants ``L`` consecutive
channels of one pixel as one vector (its channel-blocked kernel in depthwise.py).  Fed
NCHW it must first pack its input with gathers, 16 scalar loads per vector: for
mobilenet_v2's stride-2 layers that pack cost more than the convolution
(96x112x112/2: 0.29 ms against ONNX Runtime's 0.14, which keeps the whole net in NCHW16c).
The kernel before it, normally the block's expand conv, computes its output tile with the
channels as the vector axis anyway (conv2d.py), so writing NCHW[L]c costs it nothing.

This Relax pass, run on the kernel functions of graphopt's lowering before legalization,
finds ``y = producer(...); z = depthwise_kernel(y)`` in ``main`` where ``y`` has no other
use, and

* appends ``layout_transform(NCHW -> NCHW[L]c)`` to the producer's kernel (its schedule
  folds the transform into the write-back: conv2d.py, elementwise rules elsewhere);
* starts the depthwise kernel with the inverse transform, which its schedule inlines into
  the padding copy, so the pack becomes a row copy of whole vectors.

The tensor between the two kernels changes layout; nothing else in the graph does.

When that tensor is too big to stay in a core's L2 between the two kernels (``L2_BYTES``)
and the producer is a plain dense conv, the pair becomes one kernel function instead (the
producer's body, then the consumer's): each depthwise task computes the rows it reads
(conv_depthwise.py).  Any producer qualifies then, pixel-vectorized or not: the blocked
tensor is the task's own scratch.
"""

from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .layout import static_shape

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
# A core's L2 on the machines we tune for (Zen 4/5, Sapphire Rapids: 1-2 MiB; Cortex-A72: 1 MiB shared).
L2_BYTES = 1 << 20


def _first_call(func: relax.Function):
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding.value, relax.Call):
                return binding.value
    return None


def _reads_blocked_input(func: relax.Function, lanes: int, producer_vectorizes_pixels: bool) -> bool:
    """A one-input kernel whose first op is a float32 depthwise conv (one channel per group,
    channels a multiple of ``lanes``) of that input."""
    if len(func.params) != 1:
        return False
    call = _first_call(func)
    if call is None or not call.op.same_as(_CONV2D) or not call.args[0].same_as(func.params[0]):
        return False
    shape, weight_shape = static_shape(func.params[0].ty), static_shape(call.args[1].ty)
    attrs = call.attrs
    if not (shape is not None and len(shape) == 4 and str(func.params[0].ty.dtype) == "float32"
            and str(attrs.data_layout) == "NCHW" and str(attrs.out_layout) == "NCHW"
            and int(attrs.groups) == shape[1] and shape[1] % lanes == 0
            and weight_shape is not None and weight_shape[0] == shape[1]):
        return False
    # Strided or short rows gain most (96x112x112/2 0.29 -> 0.14, 960x7x7 0.037 -> 0.019,
    # 192x28x28 0.063 -> 0.050 ms).  Wide stride-1 rows have a width-vectorized kernel of
    # their own, about as fast as the blocked one (32x112x112: 0.050 vs 0.062 ms), so they
    # take NCHW[L]c only from a producer that saves by writing it: a channel-vectorized conv,
    # whose NCHW write-back transposes its tile (mobilenet_v2's first conv, 3 -> 32 at
    # stride 2: 0.093 -> 0.064 ms), not a 1x1 conv with its pixel-vectorized kernel.
    out_width = static_shape(call.ty)[3]
    strided_or_short = any(int(s) > 1 for s in attrs.strides) or out_width < 2 * lanes
    return strided_or_short or not producer_vectorizes_pixels


def _writes_conv_output(func: relax.Function) -> bool:
    """A kernel that computes a dense conv2d and returns one static NCHW float32 tensor."""
    call, shape = _first_call(func), static_shape(func.ret_ty)
    return (call is not None and call.op.same_as(_CONV2D) and int(call.attrs.groups) == 1
            and str(call.args[0].ty.dtype) == "float32" and str(func.ret_ty.dtype) == "float32"
            and shape is not None and len(shape) == 4)


def _vectorizes_pixels(func: relax.Function, lanes: int) -> bool:
    """A 1x1 stride-1 conv whose output plane splits into whole vectors: conv2d.py gives it
    the pixel-vectorized kernel, which writes NCHW for free."""
    call, shape = _first_call(func), static_shape(func.ret_ty)
    kernel, layout = static_shape(call.args[1].ty), str(call.attrs.kernel_layout)
    return (kernel is not None and kernel[layout.index("H")] == kernel[layout.index("W")] == 1
            and all(int(s) == 1 for s in call.attrs.strides) and (shape[2] * shape[3]) % lanes == 0)


def _blocked_type(shape: list[int], lanes: int, dtype: str) -> relax.TensorType:
    n, c, h, w = shape
    return relax.TensorType([n, c // lanes, h, w, lanes], dtype)


def _typed(expr):
    """``expr`` with its type inferred (a new op call or SeqExpr has none until normalized)."""
    return relax.BlockBuilder().normalize(expr)


def _with_blocked_output(func: relax.Function, lanes: int) -> relax.Function:
    shape = static_shape(func.ret_ty)
    out = relax.Var("blocked", _blocked_type(shape, lanes, "float32"))
    to_blocked = _typed(relax.op.layout_transform(func.body.body,
                                                  lambda n, c, h, w: (n, c // lanes, h, w, c % lanes)))
    body = _typed(relax.SeqExpr([*func.body.blocks, relax.BindingBlock([relax.VarBinding(out, to_blocked)])], out))
    return relax.Function(func.params, body, out.ty, func.is_pure, func.attrs)


def _with_blocked_input(func: relax.Function, lanes: int) -> relax.Function:
    old = func.params[0]
    param = relax.Var(old.name, _blocked_type(static_shape(old.ty), lanes, "float32"))
    # The old parameter becomes a variable bound to the unblocked input: the body is unchanged.
    to_nchw = _typed(relax.op.layout_transform(param, lambda n, co, h, w, ci: (n, co * lanes + ci, h, w)))
    body = _typed(relax.SeqExpr([relax.BindingBlock([relax.VarBinding(old, to_nchw)]), *func.body.blocks],
                                func.body.body))
    return relax.Function([param], body, func.ret_ty, func.is_pure, func.attrs)


def _uses(main: relax.Function) -> Counter:
    """How many bindings (and the function's result) read each variable of ``main``."""
    values = [b.value for block in main.body.blocks for b in block.bindings] + [main.body.body]
    return Counter(var for value in values for var in relax.analysis.free_vars(value))


def _worth_fusing(producer: relax.Function) -> bool:
    """A dense conv (one input, NCHW data, HWIO weight) whose output would not stay in a
    core's L2 between two kernels: computed inside each depthwise task instead, it never
    leaves L2 (conv_depthwise.py).  Smaller tensors gain nothing: mobilenet_v2's 192x28x28
    (0.6 MB) ran as fast chained as apart, and 960x7x7 slower chained, where the separate
    conv streams its weights better (0.048 vs 0.041 ms)."""
    call, shape = _first_call(producer), static_shape(producer.ret_ty)
    if shape is None or 4 * shape[0] * shape[1] * shape[2] * shape[3] < L2_BYTES:
        return False
    return (call is not None and len(producer.params) == 1 and str(call.attrs.data_layout) == "NCHW"
            and str(call.attrs.kernel_layout) == "HWIO" and static_shape(call.args[0].ty) is not None)


def _chained(producer: relax.Function, consumer: relax.Function) -> relax.Function:
    """One kernel function: ``producer``'s body, then ``consumer``'s with its parameter bound
    to ``producer``'s result."""
    link = relax.BindingBlock([relax.VarBinding(consumer.params[0], producer.body.body)])
    body = _typed(relax.SeqExpr([*producer.body.blocks, link, *consumer.body.blocks], consumer.body.body))
    return relax.Function(producer.params, body, consumer.ret_ty, producer.is_pure, producer.attrs)


@mutator
class _RetargetCalls(PyExprMutator):
    """Re-emits ``main`` with calls to replaced kernels pointing at their new versions (the
    binding variables pick up the new struct info on the way).  ``merged`` maps a consumer
    kernel to (its producer, the chained kernel): the producer's call is dropped and the
    consumer's becomes a call of the chain on the producer's arguments."""

    def __init__(self, mod: tvm.IRModule, replacements: dict, merged: dict | None = None):
        super().__init__(mod)
        self.new_gvs = {old: self.builder_.add_func(func, old.name_hint) for old, func in replacements.items()}
        merged = merged or {}
        self.chains = {consumer: self.builder_.add_func(func, f"{producer.name_hint}_{consumer.name_hint}")
                       for consumer, (producer, func) in merged.items()}
        self.chain_producers = {producer for producer, _ in merged.values()}
        self.dropped = {}  # producer binding var -> its call's arguments

    def visit_var_binding_(self, binding):  # noqa: N802 - PyExprMutator naming
        value = binding.value
        if isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar) and value.op in self.chain_producers:
            self.dropped[binding.var] = value.args
            return
        super().visit_var_binding_(binding)

    def visit_call_(self, call):  # noqa: N802 - PyExprMutator naming
        if isinstance(call.op, relax.GlobalVar) and call.op in self.chains:
            return relax.Call(self.chains[call.op], [self.visit_expr(arg) for arg in self.dropped[call.args[0]]])
        new_gv = self.new_gvs.get(call.op) if isinstance(call.op, relax.GlobalVar) else None
        if new_gv is None:
            return super().visit_call_(call)
        return relax.Call(new_gv, [self.visit_expr(arg) for arg in call.args])


def _pairs(mod: tvm.IRModule, main: relax.Function, lanes: int, fuse: bool) -> list:
    """(producer, consumer, chain) for kernels connected by a tensor nothing else reads, where
    the consumer gains from reading it NCHW[lanes]c; ``chain``: the two become one kernel."""
    uses = _uses(main)
    calls = [b for block in main.body.blocks for b in block.bindings
             if isinstance(b.value, relax.Call) and isinstance(b.value.op, relax.GlobalVar)]
    # A kernel function called more than once would change for every caller: not those.
    times_called = Counter(b.value.op for b in calls)
    producer_of = {b.var: b.value.op for b in calls}
    pairs = []
    for b in calls:
        consumer, args = b.value.op, b.value.args
        if len(args) != 1 or args[0] not in producer_of or uses.get(args[0]) != 1:
            continue
        producer = producer_of[args[0]]
        if times_called[producer] != 1 or times_called[consumer] != 1:
            continue
        if not (isinstance(mod[consumer], relax.Function) and isinstance(mod[producer], relax.Function)
                and _writes_conv_output(mod[producer])):
            continue
        # Chained, the tensor between them is the task's own scratch: any producer will do.
        chain = fuse and _worth_fusing(mod[producer]) and _reads_blocked_input(mod[consumer], lanes, False)
        if chain or _reads_blocked_input(mod[consumer], lanes, _vectorizes_pixels(mod[producer], lanes)):
            pairs.append((producer, consumer, chain))
    return pairs


def block_depthwise_inputs(lanes: int, fuse: bool = True) -> tvm.transform.Pass:
    """Module pass: producer -> depthwise kernel pairs exchange NCHW[lanes]c (module doc);
    with ``fuse``, pairs worth it become one kernel (``_worth_fusing``)."""

    @tvm.transform.module_pass(opt_level=0, name="graphopt.BlockDepthwiseInputs")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mains = [gv for gv in mod.get_global_vars() if gv.name_hint == "main"]
        if not mains or not isinstance(mod[mains[0]], relax.Function):
            return mod
        main_gv = mains[0]
        pairs = _pairs(mod, mod[main_gv], lanes, fuse)
        if not pairs:
            return mod
        replacements, merged = {}, {}
        for producer, consumer, chain in pairs:
            blocked_out = _with_blocked_output(mod[producer], lanes)
            blocked_in = _with_blocked_input(mod[consumer], lanes)
            if chain:
                merged[consumer] = (producer, _chained(blocked_out, blocked_in))
            else:
                replacements[producer], replacements[consumer] = blocked_out, blocked_in
        # The replaced kernels leave first, so their new versions keep their names.
        gone = set(replacements) | set(merged) | {p for p, _ in merged.values()}
        kept = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in gone}, attrs=mod.attrs)
        rewriter = _RetargetCalls(kept, replacements, merged)
        rewriter.builder_.update_func(main_gv, rewriter.visit_expr(mod[main_gv]))
        return rewriter.builder_.get()

    return _pass
