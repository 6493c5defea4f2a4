"""The vision tower and projector of an fp16 model computed in fp32, for CPUs without fp16 arithmetic.

x86 has no fp16 arithmetic (before AVX512-FP16): LLVM converts every fp16 operation to fp32 and back,
so an fp16 CLIP-L/336 took 8.5 s per image against 1.3 s in fp32 on the same two cores. The decoder
keeps fp16 (its GEMVs widen each weight once anyway; decode is memory-bound), only `image_embed` and
`vision_features` change: their fp16 inputs (pixels, the parameters they unpack) are widened where they
are used, fp16 constants and casts to fp16 become fp32, types are re-inferred, and the result is
rounded to the model dtype at the end. The weights stay fp16 in memory and on disk (the dist and MLC's
parameter list are unchanged); each widening fuses into the kernel that reads the weight.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

VISION_FUNCTIONS = ("image_embed", "vision_features")
_ASTYPE = tvm.ir.Op.get("relax.astype")
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _is_half(expr: relax.Expr) -> bool:
    return isinstance(expr.ty, relax.TensorType) and expr.ty.dtype == "float16"


@mutator
class _WidenToFloat32(PyExprMutator):
    """Rewrites one function: `inputs` (fp16 parameters and the packed-parameter items) widened at their
    first use, fp16 constants widened, casts to fp16 dropped; calls re-infer their types."""

    def __init__(self, mod: tvm.IRModule, inputs: set[relax.Var]):
        super().__init__(mod)
        self.inputs = inputs
        self.widened: dict[relax.Var, relax.Var] = {}

    def _widen(self, var: relax.Var) -> relax.Var:
        if var not in self.widened:
            self.widened[var] = self.builder_.emit(relax.op.astype(var, "float32"))
        return self.widened[var]

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        return self._widen(var) if var in self.inputs else super().visit_var_(var)

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> relax.Expr:
        return self._widen(var) if var in self.inputs else super().visit_dataflow_var_(var)

    def visit_generic_const_(self, const: relax.Constant) -> relax.Expr:
        return relax.const(const.value.numpy().astype("float32"), "float32") if _is_half(const) else const

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        new = self.visit_expr_post_order(call)
        # a TIR kernel has fixed types: fine for the image preprocessing (uint8 -> float32), not for fp16
        if new.op == _CALL_TIR and (_is_half(new) or any(_is_half(arg) for arg in new.args[1].fields)):
            raise ValueError("the function calls an fp16 TIR kernel directly")
        if new.op == _ASTYPE and new.attrs.dtype == "float16":
            return new.args[0]
        return new


def widen_to_float32(mod: tvm.IRModule, func: relax.Function) -> relax.Function:
    """`func` computing in fp32, returning its original fp16 result."""
    params = list(func.params)
    inputs = {p for p in params if _is_half(p)}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (
                isinstance(value, relax.TupleGetItem)
                and any(value.tuple_value.same_as(p) for p in params)
                and _is_half(binding.var)
            ):
                inputs.add(binding.var)
    widened = _WidenToFloat32(mod, inputs).visit_expr(func)
    result, dtype = widened.body.body, func.body.body.ty.dtype
    output = relax.Var("output", relax.TensorType(result.ty.shape, dtype))
    rounded = relax.BindingBlock([relax.VarBinding(output, relax.op.astype(result, dtype))])
    return relax.Function(
        widened.params,
        relax.SeqExpr([*widened.body.blocks, rounded], output),
        func.ret_ty,
        widened.is_pure,
        widened.attrs,
    )


@tvm.transform.module_pass(opt_level=0, name="VisionInFloat32")
def vision_in_float32(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """`widen_to_float32` for the vision entry points of an fp16 model; fp32 models pass through."""
    for gv in mod.get_global_vars():
        if gv.name_hint in VISION_FUNCTIONS and _is_half(mod[gv].body.body):
            mod[gv] = widen_to_float32(mod, mod[gv])
    return relax.transform.Normalize()(mod)
