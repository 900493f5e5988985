"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton builds its @triton.jit functions (see below). The
interpreter casts fp32 -> bf16 by truncation where the GPU (cvt.rn.bf16.f32) rounds to nearest even;
that is patched so the bf16 tolerances test the numerics the GPU has. (Its bf16 tl.dot is wrong too:
the launchers run dots on fp32 operands under the interpreter, see kernels.routing.fp32_dot.)
This holds on a GPU machine too (the interpreter is forced here), so these tests do not check the
compiled kernels: the GPU checks are scripts/bench_kernels.py's correctness pass and
kernels.slot_plan.self_check (run by scripts/bench_e2e.py).
"""

import os

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

    # Triton decides at import whether @triton.jit builds interpreter functions (its own library ones
    # too), so nothing imported before this file can be switched over. The default `pytest` run collects
    # tests/kernels first; a run that imported triton earlier without the variable stops here.
    import triton.language.standard as _std

    if type(_std.sum).__name__ == "JITFunction":
        raise RuntimeError("tests/kernels run Triton's interpreter: set TRITON_INTERPRET=1 before triton "
                           "is imported (run tests/kernels first, or export the variable)")
