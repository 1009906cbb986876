"""A shape-only stand-in for expert weights that now live in the engine.

After `moetune.hf.patch`, an experts module's `gate_up_proj` / `down_proj`
are `EngineHeldTensor` parameters: they keep the original shape, dtype and
(CPU) device, so that code reading metadata (PEFT's `ParamWrapper` sizes its
LoRA from `param.shape` and places it by `param.device` / `param.dtype`,
reports, `num_parameters()`) keeps working, but they own one element of
storage (every stride is 0), and

* device/dtype conversions (`model.to("cuda")`, `.cuda()`, `.half()`,
  `.bfloat16()`, ...) return the placeholder unchanged: it never reaches a GPU
  and is never materialised by a conversion;
* any op that would read the values as weights (matmul, indexing, copy_, ...)
  raises, instead of silently computing with zeros.
"""

from __future__ import annotations

import torch

# Conversions that Module._apply / user code may apply to every parameter.
_KEEP = {
    "to",
    "cuda",
    "cpu",
    "half",
    "float",
    "double",
    "bfloat16",
    "type",
    "xpu",
    "mps",
    "pin_memory",
    "share_memory_",
    "contiguous",
}
# Reads of the values as weights: these would compute with the zero placeholder.
_REFUSE = {
    "__getitem__",
    "baddbmm",
    "bmm",
    "matmul",
    "__matmul__",
    "mm",
    "linear",
    "einsum",
    "add",
    "add_",
    "__add__",
    "__radd__",
    "__iadd__",
    "sub",
    "__sub__",
    "mul",
    "__mul__",
    "__rmul__",
    "copy_",
    "clone",
    "chunk",
    "split",
    "index_select",
    "transpose",
    "permute",
    "reshape",
    "view",
    "grouped_mm",
    "_grouped_mm",
    "numpy",
    "tolist",
    "sum",
    "mean",
    "norm",
    "abs",
    "__iter__",
    "unbind",
    "flatten",
    "addmm",
    "data_ptr",
    "untyped_storage",
}


def _name(func) -> str:
    name = getattr(func, "__name__", "")
    if not name:  # properties / descriptors
        name = getattr(getattr(func, "__objclass__", None), "__name__", "")
    return name


class EngineHeldTensor(torch.Tensor):
    """See module docstring. Build with `EngineHeldTensor.like(t)`."""

    @staticmethod
    def like(t: torch.Tensor) -> EngineHeldTensor:
        one = torch.zeros(1, dtype=t.dtype, device="cpu")
        base = one.as_strided(tuple(t.shape), (0,) * t.dim())
        held = base.as_subclass(EngineHeldTensor)
        return held

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name in _KEEP and args and isinstance(args[0], EngineHeldTensor):
            return args[0]
        if name in _REFUSE:
            raise RuntimeError(
                f"moetune: this expert weight is held by the moetune engine (patched by moetune.hf.patch); "
                f"its module parameter is a shape-only placeholder and cannot be used by `{name}`. "
                "Run the experts through the module's forward, or call handle.undo() first."
            )
        return super().__torch_function__(func, types, args, kwargs)

    def __repr__(self, *, tensor_contents=None):  # noqa: D105
        return f"EngineHeldTensor(shape={tuple(self.shape)}, dtype={self.dtype}, held by the moetune engine)"

    def __deepcopy__(self, memo):
        new = EngineHeldTensor.like(self)
        if isinstance(self, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=False)
        memo[id(self)] = new
        return new

    @property
    def nbytes_held(self) -> int:
        return self.element_size()


def held_parameter(t: torch.Tensor) -> torch.nn.Parameter:
    """A frozen nn.Parameter placeholder with t's shape and dtype."""
    return torch.nn.Parameter(EngineHeldTensor.like(t), requires_grad=False)
