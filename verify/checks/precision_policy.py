"""Which dtype each op really ran in: a dispatch-mode recorder and the mixed-precision policy it is judged by.

Under autocast every matmul of a ``nn.Linear`` and of attention must run in the half dtype, and the reductions the
reference upcasts (softmax, log-softmax / NLL, RMSNorm's mean of squares) must see fp32 inputs.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..result import name_list as _names

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "mv", "dot"}
UPCAST_REDUCTIONS = {"_softmax", "softmax", "_log_softmax", "log_softmax", "nll_loss_forward", "nll_loss2d_forward"}
NORM_REDUCTIONS = {"mean", "sum", "var", "norm", "linalg_vector_norm"}
# ---- observation: which dtype each op really ran in -----------------------------------------------------------

class OpRecorder(TorchDispatchMode):
    """Records ``(module path, module, aten op name, input dtypes)`` of every op dispatched while active.

    The module path comes from forward hooks on ``model``'s submodules (innermost module running); ops of the loss
    and of backward run outside every module (path ``""``) unless a checkpointed block is being recomputed.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.ops: list[tuple[str, nn.Module | None, str, tuple[torch.dtype, ...]]] = []
        self._stack: list[tuple[str, nn.Module]] = []
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: self._stack.append((name, m))))
            self._handles.append(module.register_forward_hook(self._pop))

    def _pop(self, module: nn.Module, args, out) -> None:
        self._stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = list(args) + list((kwargs or {}).values())
        dtypes = tuple(a.dtype for a in flat if isinstance(a, torch.Tensor) and a.is_floating_point())
        name, module = self._stack[-1] if self._stack else ("", None)
        self.ops.append((name, module, func.overloadpacket.__name__, dtypes))
        return func(*args, **(kwargs or {}))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def is_norm(module: Optional[nn.Module]) -> bool:
    """A normalisation layer, by what it is, not by its class: named ``…Norm`` with a float ``eps`` (llama_ref's
    RMSNorm, Meta's, transformers' LlamaRMSNorm, torch's LayerNorm), so that the rule holds for any model's norm."""
    return (module is not None and type(module).__name__.lower().endswith("norm")
            and isinstance(getattr(module, "eps", getattr(module, "variance_epsilon", None)), float))


def is_rotary(module: Optional[nn.Module]) -> bool:
    """A rotary-embedding module (transformers' ``…RotaryEmbedding``: an ``inv_freq`` tensor), whose angle matmul
    ``inv_freq ⊗ positions`` must stay fp32 under autocast (in bf16, positions above 256 lose their integer part:
    transformers#29285)."""
    return module is not None and isinstance(getattr(module, "inv_freq", None), torch.Tensor)


def _is_matmul(op: str) -> bool:
    return op in MATMULS or op.startswith("_scaled_dot_product")


def precision_policy_problems(rec: OpRecorder, model: nn.Module, half: torch.dtype) -> list[str]:
    """Linear and attention matmuls in ``half``; softmax, log-softmax, NLL and RMSNorm reductions and a rotary
    embedding's angle matmul in fp32 (or fp64)."""
    wide = (torch.float32, torch.float64)
    linear_ops: dict[str, list[tuple[str, tuple]]] = defaultdict(list)
    other_mm, narrow_reductions, narrow_norms, narrow_rope = [], [], [], []
    for name, module, op, dtypes in rec.ops:
        if _is_matmul(op) and module is not None:
            if isinstance(module, nn.Linear):
                linear_ops[name].append((op, dtypes))
            elif is_rotary(module):
                if any(d not in wide for d in dtypes):
                    narrow_rope.append(f"{name} {op}({_dt(dtypes)})")
            elif any(d != half for d in dtypes):
                other_mm.append(f"{name or 'model'} {op}({_dt(dtypes)})")
        elif op in UPCAST_REDUCTIONS and any(d not in wide for d in dtypes):
            narrow_reductions.append(f"{op}({_dt(dtypes)}) in {name or 'the loss'}")
        elif is_norm(module) and op in NORM_REDUCTIONS and any(d not in wide for d in dtypes):
            narrow_norms.append(f"{name} {op}({_dt(dtypes)})")
    problems = []
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    idle = [n for n in linears if not linear_ops.get(n)]
    not_half = [f"{n} {op}({_dt(d)})" for n in linears for op, d in linear_ops.get(n, []) if any(x != half for x in d)]
    if not_half:
        problems.append(f"Linear matmuls not in {_dt((half,))} under autocast: {_names(not_half)}")
    if idle:
        problems.append(f"Linear modules that ran no matmul under observation: {_names(idle)}")
    if other_mm:
        problems.append(f"attention matmuls not in {_dt((half,))}: {_names(other_mm)}")
    if narrow_reductions:
        problems.append(f"softmax / loss reductions not upcast to fp32: {_names(narrow_reductions)}")
    if narrow_rope:
        problems.append(f"RoPE angles (inv_freq x positions) not in fp32: {_names(narrow_rope)}")
    if narrow_norms:
        problems.append(f"norm reductions (mean of squares) not upcast to fp32: {_names(narrow_norms)}")
    return problems


def autocast_observed(device_type: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Does ``torch.autocast(device_type, dtype)`` really run a matmul in ``dtype`` here (observed, not asked of
    ``llama_ref.train.trainer.autocast_supported``)? And if not, why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = torch.ones(2, 2, device=device_type)
            with torch.autocast(device_type, dtype=dtype):
                out = a @ a
        if out.dtype != dtype:
            return False, f"torch {torch.__version__}: autocast({device_type!r}, {dtype}) gave {out.dtype}"
        return True, ""
    except Exception as e:
        return False, f"torch {torch.__version__}: autocast({device_type!r}, {dtype}) raised {type(e).__name__}: {e}"


def dtype_names(dtypes) -> str:
    return ",".join(str(d).replace("torch.", "") for d in dtypes)


_dt = dtype_names
