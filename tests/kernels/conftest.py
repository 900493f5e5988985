"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton builds the @triton.jit functions; if another test package
imported the kernel modules first, they are rebuilt here. The interpreter casts fp32 -> bf16 by
truncation where the GPU (cvt.rn.bf16.f32) rounds to nearest even; that is patched so the bf16
tolerances below test the numerics the GPU has. (Its bf16 tl.dot is wrong too: the launchers run dots
on fp32 operands under the interpreter, see kernels.routing.fp32_dot.)
"""

import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    import triton.language as tl
    from triton.runtime import interpreter as _interp
except ImportError:  # the test modules skip themselves
    _interp = None

if _interp is not None and os.environ["TRITON_INTERPRET"] == "1":
    _cast = _interp.InterpreterBuilder.cast_impl

    def _cast_rne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return _interp.TensorHandle(as_bf16.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return _cast(self, src, dst_type)

    _interp.InterpreterBuilder.cast_impl = _cast_rne

    for _name in ("kernels.routing", "kernels.expert_ffn"):
        _mod = sys.modules.get(_name)
        _kernel = getattr(_mod, "_route_kernel", None) or getattr(_mod, "_decode_in_kernel", None)
        if _kernel is not None and type(_kernel).__name__ != "InterpretedFunction":
            importlib.reload(_mod)
