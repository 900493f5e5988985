"""The device side of host-issued expert copies (offload copy_mode "dma"): two one-program kernels.

Why: the copy engines (cudaMemcpyAsync from pinned memory) move an expert faster over PCIe than a
kernel reading pinned memory through its mapped address, but they are started by the host, which
does not know the expert ids the routing chose on the GPU. The handshake keeps the decode step one
CUDA graph:

  in the graph (a side stream), a plan for block m:  post: g = head + 1; posted[m] += 1;
        ring[g % R] = [m, posted[m], src..., dst..., g]; head = g, the ring and a copy of the head
        (head_host) in pinned host memory, written by the kernel itself: the entry, then a system-scope
        fence, then head_host, so the host never sees a head before its entry (the earlier form kept the
        ring on the device and copied it, then the head, to the host in stream order);
  a host thread:  handles entries head_seen + 1 .. head in order (the order the plans were made, so a
        later plan's copy into a slot lands after an earlier one's): one cudaMemcpyAsync per expert on
        its own stream, then done[m] <- the entry's posted[m] (on a second stream behind an event, so
        that the next plan's copies do not wait for that write);
  in the graph (compute stream), before block m's expert FFN:  wait: spin until done[m] >= posted[m].

A plan whose wait never comes (a prefetch the block did not use) is still copied: its slots were
booked. The wait kernel gives up after MAX_ITERS polls and counts a timeout instead of hanging the
GPU (and once one has timed out, the later ones do not wait); the pool turns a counted timeout into
an error (infer.offload.SlotPool.close).

Legend: n plan entries (slots) per block; a plan entry src[j] < 0 means nothing to copy; R ring entries
of W = 2n + 3 int64 each.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _fence_system(x):
        # fence.sc.sys: this thread's earlier stores (to host memory too) are seen before its later ones
        return tl.inline_asm_elementwise("fence.sc.sys;\n\tmov.u32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                         is_pure=False, pack=1)

    @triton.jit
    def _post_kernel(src_ptr, dst_ptr, ring_ptr, head_ptr, posted_ptr, head_host_ptr, m, m_word, N, R,
                     BLOCK: tl.constexpr, HOST_HEAD: tl.constexpr, FENCE: tl.constexpr):
        g = tl.load(head_ptr) + 1
        b = tl.load(posted_ptr + m) + 1
        tl.store(posted_ptr + m, b)
        e = ring_ptr + (g % R) * (2 * N + 3)
        tl.store(e, m_word)  # m, with the plan's flags above bit 32
        tl.store(e + 1, b)
        offs = tl.arange(0, BLOCK)
        for start in range(0, N, BLOCK):
            j = start + offs
            mask = j < N
            tl.store(e + 2 + j, tl.load(src_ptr + j, mask=mask).to(tl.int64), mask=mask)
            tl.store(e + 2 + N + j, tl.load(dst_ptr + j, mask=mask).to(tl.int64), mask=mask)
        tl.store(e + 2 + 2 * N, g)
        tl.store(head_ptr, g)
        if HOST_HEAD:  # the host's head, after the entry: the program's stores, a barrier, then a system fence
            one = tl.arange(0, 1)
            g_1 = g + tl.zeros([1], dtype=tl.int64)
            if FENCE:  # (the fence's result, 0, feeds the stored value: the store cannot move above it)
                tl.debug_barrier()
                g_1 = g_1 + _fence_system(tl.zeros([1], dtype=tl.int32)).to(tl.int64)
            tl.store(head_host_ptr + one, g_1)

    @triton.jit
    def _wait_kernel(done_ptr, posted_ptr, err_ptr, MAX_ITERS):
        want = tl.load(posted_ptr, volatile=True)
        v = tl.load(done_ptr, volatile=True)
        i = 0
        if tl.load(err_ptr, volatile=True) > 0:  # an earlier wait timed out: the copier is gone, fail fast
            i = MAX_ITERS
        while (v < want) & (i < MAX_ITERS):
            v = tl.load(done_ptr, volatile=True)
            i += 1
        if v < want:
            tl.atomic_add(err_ptr, 1)


FLAG_SHIFT = 32  # a ring entry's first word: m | flags << FLAG_SHIFT
FLAG_EARLY = 1  # the first-block guess's plan: its copy may have been started already (infer.offload.DmaCopier)


def post(m: int, src_n: torch.Tensor, dst_n: torch.Tensor, ring: torch.Tensor, head: torch.Tensor,
         posted: torch.Tensor, head_host: torch.Tensor | None = None, flags: int = 0) -> None:
    """On the current stream: g = head + 1; posted[m] += 1; ring[g % R] = [m | flags << 32, posted[m], src_n, dst_n,
    g]; head = g. ring int64 [R, 2n + 3]; head int64 [1]; posted int64 [M]. head_host: an int64 [1] the kernel
    also writes g to, after the entry is written (on a GPU through a system-scope fence): with ring and
    head_host in pinned host memory the host reads a plan with no copy in between. flags: FLAG_EARLY or 0."""
    n = src_n.numel()
    if ring.dim() != 2 or ring.shape[1] != 2 * n + 3 or ring.dtype != torch.int64 or not ring.is_contiguous():
        raise ValueError(f"ring must be contiguous int64 [R, 2n + 3 = {2 * n + 3}], got {ring.dtype} "
                         f"{tuple(ring.shape)}")
    if head.dtype != torch.int64 or posted.dtype != torch.int64:
        raise ValueError(f"head and posted must be int64, got {head.dtype} and {posted.dtype}")
    block = max(16, triton.next_power_of_2(min(n, 1024)))
    if head_host is not None and (head_host.dtype != torch.int64 or head_host.numel() != 1):
        raise ValueError(f"head_host must be int64 [1], got {head_host.dtype} {tuple(head_host.shape)}")
    fence = src_n.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"  # (the interpreter runs no PTX)
    if flags not in (0, FLAG_EARLY):
        raise ValueError(f"post: flags={flags}; expected 0 or FLAG_EARLY ({FLAG_EARLY})")
    _post_kernel[(1,)](src_n, dst_n, ring, head, posted, head if head_host is None else head_host, m,
                       m | flags << FLAG_SHIFT, n, ring.shape[0], BLOCK=block, HOST_HEAD=head_host is not None,
                       FENCE=fence, num_warps=1)


def post_reference(m, src_n, dst_n, ring, head, posted, head_host=None, flags: int = 0) -> None:
    head += 1
    posted[m] += 1
    g = int(head)
    ring[g % ring.shape[0]] = torch.cat([torch.tensor([m | flags << FLAG_SHIFT, int(posted[m])]), src_n.long().cpu(),
                                         dst_n.long().cpu(), torch.tensor([g])]).to(ring.device)
    if head_host is not None:
        head_host.fill_(g)


def wait(done: torch.Tensor, posted: torch.Tensor, err: torch.Tensor, max_iters: int) -> None:
    """Hold the current stream until done[0] >= posted[0] (one-element int64 views); after max_iters polls
    err[0] += 1 and go on. Once err[0] > 0 it does not wait at all (counting each such wait)."""
    _wait_kernel[(1,)](done, posted, err, max_iters, num_warps=1)


__all__ = ["post", "post_reference", "wait", "FLAG_SHIFT", "FLAG_EARLY", "HAVE_TRITON"]
