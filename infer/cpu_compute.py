"""Computing a missed expert on the CPU instead of copying it (as in Fiddler; beyond the paper).

`offload.cpu_compute`:
  off     (default) every miss is copied into a slot.
  auto    a cost model decides per missed expert of an on-demand plan:
            copy  = expert bytes / link bandwidth (offload.link_GBps, or one expert's measured copy)
            cpu   = t_cpu(1 token) + (n - 1) * t_cpu(per extra token) + host round trip
          with t_cpu measured once per engine on the actual store (one expert's w_in/w_out matvec
          and a 32-token matmul with torch on the host tensors), the round trip (activation to the
          host, result back, a sync) measured or given (offload.cpu_overhead_ms). The expert is
          computed on the CPU when cpu < copy. When even one token on the CPU cannot beat the copy,
          the run never reads a plan on the host (nothing changes: same graph, same bits).
  always  every miss of an on-demand plan is computed on the CPU (tests, measurement).

"On-demand plan": the plan made at a block's own fetch (on_demand, the first block of each stack
under the prefetching policies, speculative's wrong guesses); experts already being copied by a
prefetch are not misses. The GPU computes the resident experts with the CPU-computed tokens'
weights zeroed (their table entry keeps a stale, valid slot); the CPU part is added to its output.
Reading the misses on the host is a sync, so an active step is not graph-capturable.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from kernels.expert_ffn import _act

MODES = ("off", "auto", "always")


@dataclass
class Calibration:
    expert_bytes: int
    dtype: str
    cpu_threads: int
    cpu_ms_1tok: float  # one expert, one token: w_in and w_out matvecs on the host tensors
    cpu_ms_per_extra_token: float  # slope from a 32-token matmul
    cpu_gemv_GBps: float  # expert bytes / cpu_ms_1tok
    copy_GBps: float  # used by the model: offload.link_GBps, or measured
    copy_GBps_measured: float | None  # one expert's copy store -> slot memory (device)
    copy_ms: float  # expert bytes / copy_GBps
    overhead_ms: float  # host round trip per block (activation to host, result back, sync)
    overhead_measured: bool

    def cpu_ms(self, n_tokens: int) -> float:
        return self.cpu_ms_1tok + max(0, n_tokens - 1) * self.cpu_ms_per_extra_token + self.overhead_ms

    def cpu_wins(self, n_tokens: int) -> bool:
        return self.cpu_ms(n_tokens) < self.copy_ms

    def max_tokens(self) -> int:
        """The most tokens of one expert for which the CPU is predicted faster (0: never)."""
        if not self.cpu_wins(1):
            return 0
        if self.cpu_ms_per_extra_token <= 0:
            return 1 << 30
        return math.ceil((self.copy_ms - self.cpu_ms(1)) / self.cpu_ms_per_extra_token)  # cpu(n) < copy

    def as_dict(self) -> dict:
        return {**asdict(self), "cpu_wins_up_to_tokens": self.max_tokens()}


def _best_ms(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 1e3 * best


def calibrate(
    store, device, link_GBps: float | None = None, overhead_ms: float | None = None, n_tokens: int = 32
) -> Calibration:
    """Measure the cost model's numbers on the actual store (block 0, expert 0)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    w_in, w_out = store.w_in(0, 0), store.w_out(0, 0)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, store.D, generator=g).to(store.dtype)
    xn = torch.randn(n_tokens, store.D, generator=g).to(store.dtype)

    def ffn(x):
        return torch.relu(x @ w_in.t()) @ w_out.t()

    t1 = _best_ms(lambda: ffn(x1))
    tn = _best_ms(lambda: ffn(xn))
    per_tok = max(0.0, (tn - t1) / (n_tokens - 1))
    # one expert's copy into device memory (what a miss costs without CPU compute)
    src = store.data[0, 0]
    dst = torch.empty_like(src, device=device)

    def copy():
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)

    copy_ms_meas = _best_ms(copy)
    measured = store.expert_bytes / (copy_ms_meas / 1e3) / 1e9 if copy_ms_meas > 0 else float("inf")
    gbps = float(link_GBps) if link_GBps else measured
    if overhead_ms is None:
        xd = torch.zeros(1, store.D, dtype=store.dtype, device=device)

        def trip():
            y = xd.to("cpu")
            y.to(device)
            if cuda:
                torch.cuda.synchronize(device)

        ov = _best_ms(trip)
    else:
        ov = float(overhead_ms)
    return Calibration(
        expert_bytes=store.expert_bytes,
        dtype=str(store.dtype).replace("torch.", ""),
        cpu_threads=torch.get_num_threads(),
        cpu_ms_1tok=t1,
        cpu_ms_per_extra_token=per_tok,
        cpu_gemv_GBps=store.expert_bytes / (t1 / 1e3) / 1e9 if t1 > 0 else float("inf"),
        copy_GBps=gbps,
        copy_GBps_measured=measured,
        copy_ms=1e3 * store.expert_bytes / (gbps * 1e9),
        overhead_ms=ov,
        overhead_measured=overhead_ms is None,
    )


def host_experts(store, m: int, experts: list[int], x_ND, ids_Nk, w_Nk, activation: str) -> torch.Tensor:
    """sum over the given experts of block m: w * act(x @ W_in^T) @ W_out^T, on the host tensors of
    the store (as kernels.expert_ffn.expert_ffn_reference computes one expert's rows)."""
    y = torch.zeros_like(x_ND)
    ids = ids_Nk.long()
    for e in experts:
        tok, j = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        w_in, w_out = store.w_in(m, e), store.w_out(m, e)
        h = _act(x_ND[tok].to(w_in.dtype) @ w_in.t(), activation)
        out = (h @ w_out.t()) * w_Nk[tok, j, None].to(h.dtype)
        y.index_add_(0, tok, out.to(y.dtype))
    return y
