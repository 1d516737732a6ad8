"""The decoder step writes its self-attention caches in place.

The exported step (``hatc.compile.graphs.DecoderStepGraph``) keeps static shapes by
computing each layer's cache as ``where(slot == step, k, cache)``: a new (B, h, T, hd)
tensor every step, the whole cache read and written, per layer and per key and value
(``tiny`` largest at beam 1: 0.8 MB a step, about a tenth of an int8 step).
``write_caches_in_place`` rewrites each such ``where`` over a cache input of the
imported Relax module into one ``call_tir_inplace`` of a kernel that stores the
step's slot into the input cache and returns that same tensor. A step therefore
mutates the caches it is given (``hatc.runtime.runners.Decoding`` gives each
sentence fresh ones); the output is unchanged, and so is a repeated call with the
same inputs: the slot a step writes is the one it reads its new key from.

ONNX Runtime keeps the ``where`` (the exported graph is not changed).

TVM is imported inside functions only.
"""

from __future__ import annotations

from typing import Any

KERNEL_NAME = "write_cache_slot"  # no TUNED_OPS substring: plain loops, never a tuning workload
# TVM's kOpaque: FuseOps leaves the write a kernel of its own (FuseTIR cannot fuse an in-place call)
OPAQUE = 8


def _slot_writer(shape: tuple[int, ...], dtype: str) -> Any:
    """A PrimFunc (cache (B, h, T, hd), new (B, h, 1, hd), step (1,)) storing ``new`` at
    slot ``step`` of ``cache``; a step outside 0..T-1 writes nothing (the ``where`` did not)."""
    from tvm.script import tirx as T

    batch, heads, slots, width = shape

    @T.prim_func(private=True)
    def write_cache_slot(
        cache: T.Buffer((batch, heads, slots, width), dtype),
        new: T.Buffer((batch, heads, 1, width), dtype),
        step: T.Buffer((1,), "int64"),
    ):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE})
        if step[0] >= T.int64(0) and step[0] < T.int64(slots):
            for b, h, d in T.grid(batch, heads, width):
                cache[b, h, step[0], d] = new[b, h, 0, d]

    return write_cache_slot


def _is_op(expr: Any, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _is_step_mask(expr: Any, step: Any, lookup: Any) -> bool:
    """Whether ``expr`` is ``equal(slots, step)`` behind any number of ``expand_dims``."""
    from tvm import relax

    while isinstance(expr, relax.Var):
        bound = lookup(expr)
        if bound is None:
            return False
        expr = bound
        if _is_op(expr, "relax.expand_dims"):
            expr = expr.args[0]
    return _is_op(expr, "relax.equal") and expr.args[1].same_as(step)


def _uses(function: Any) -> dict[Any, int]:
    """How many times each variable of ``function`` is read (definitions aside)."""
    from tvm import relax

    counts: dict[Any, int] = {}

    @relax.expr_functor.visitor
    class Uses(relax.PyExprVisitor):
        def visit_var_(self, var: Any) -> None:  # noqa: N802 - TVM's visitor name
            counts[var] = counts.get(var, 0) + 1

        def visit_dataflow_var_(self, var: Any) -> None:  # noqa: N802
            counts[var] = counts.get(var, 0) + 1

    Uses().visit_expr(function)
    return counts


def write_caches_in_place(module: Any, cache_names: list[str]) -> tuple[Any, int]:
    """``module`` with each ``where(slot == step, new, cache)`` over one of ``cache_names``
    (parameters of ``main``) as an in-place slot write; and how many were rewritten."""
    import tvm
    from tvm import relax

    main = module["main"]
    params = {p.name: p for p in main.params}
    step = params.get("step")
    # Writing a cache in place is safe only where the where is its one reader.
    uses = _uses(main)
    caches = [params[n] for n in cache_names if n in params and uses.get(params[n], 0) == 1]
    if step is None or not caches:
        return module, 0
    where, rewritten = tvm.ir.Op.get("relax.where"), 0

    @relax.expr_functor.mutator
    class InPlaceWrites(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:  # noqa: N802 - TVM's visitor name
            nonlocal rewritten
            call = super().visit_call_(call)
            if not call.op.same_as(where):
                return call
            cond, new, cache = call.args
            if not any(cache.same_as(c) for c in caches) or not _is_step_mask(cond, step, self.lookup_binding):
                return call
            shape = tuple(int(d) for d in cache.ty.shape)
            if tuple(int(d) for d in new.ty.shape) != (*shape[:2], 1, shape[3]):
                return call
            kernel = self.builder_.add_func(_slot_writer(shape, cache.ty.dtype), KERNEL_NAME)
            rewritten += 1
            return relax.call_tir_inplace(kernel, [cache, new, step], [0], cache.ty)

    mutator = InPlaceWrites(module)
    new_main = mutator.visit_expr(main)
    result = mutator.builder_.get()
    result["main"] = new_main
    return result, rewritten
