"""Slot plan of one offloaded MoE block in one Triton kernel, beside its plain-PyTorch reference.

A plan places the experts a block needs (need_E) in its candidate slots: hits stay where they are,
misses (by expert id, at most n of them) go to victims, the n slots of smallest key (ties to the lower
slot): empty or least recently / frequently used cache slots first, then staging slots; slots holding a
needed expert are never victims. It updates the block's expert->slot table, the slot holders, the LRU
use ticks or LFU counts and the hit/lookup/copy counters, and writes the copy list (plan_src, plan_dst).
The reference is ~35 small tensor ops; the kernel is one launch of one program, with no host
synchronisation and no allocation, so that it can be captured in a CUDA graph.

Legend: E experts, C cache slots, K = C + staging slots (candidate slots of the block), n staging slots
this plan may fill (n <= K - C), R routed token slots (T*k).
"""

from __future__ import annotations

import os

import torch

from kernels.routing import HAVE_TRITON, use_triton  # the kernel on CUDA; on the CPU only when forced

if HAVE_TRITON:  # CPU-only installs without triton: the reference still works
    import triton
    import triton.language as tl

# Victim keys above any LRU tick or LFU count: a slot holding an expert this plan needs (never a victim),
# a staging slot (taken only when no cache slot can take a miss).
INF_KEY = 1 << 62
LAST_KEY = 1 << 61
CACHE_KINDS = ("lru", "lfu")


# plan_slots' implementation when the caller names none: PGMOE_PLAN_IMPL=auto|triton|reference. "auto":
# the kernel on CUDA, the reference elsewhere. Measured on the H200 (bench/results/e2e-h200-plan-ab.json,
# switch-base-128, same tokens): pregated 1.52 vs 1.67 ms/token, on_demand 2.22 vs 2.71 with the reference
# plan; scripts/bench_e2e.py still runs self_check() first and falls back to the reference if it fails.
DEFAULT_IMPL = os.environ.get("PGMOE_PLAN_IMPL", "auto")


# --------------------------------------------------------------------------------------------- reference
def plan_slots_reference(
    need_E: torch.Tensor,
    holder_K: torch.Tensor,
    cand_slot_K: torch.Tensor,
    table_E: torch.Tensor,
    last_use_C: torch.Tensor,
    freq_E: torch.Tensor,
    tick: torch.Tensor,
    hits: torch.Tensor,
    lookups: torch.Tensor,
    copied: torch.Tensor,
    plan_src: torch.Tensor,
    plan_dst: torch.Tensor,
    *,
    C: int,
    n: int,
    cache_kind: str = "lru",
    fresh: bool = True,
    ids: torch.Tensor | None = None,
    lookup: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan in plain PyTorch (the semantics of OffloadRunner._plan). See plan_slots."""
    if lookup is not None:
        ids = _lookup_reference(*lookup)
    _check(need_E, holder_K, cand_slot_K, table_E, last_use_C, freq_E, plan_src, plan_dst, C, n, cache_kind, ids)
    if ids is not None:  # (ids < 0: none)
        v = ids.reshape(-1).long()
        need = torch.zeros(need_E.numel() + 1, dtype=torch.bool, device=need_E.device)
        need_E.copy_(need.index_fill_(0, torch.where(v >= 0, v, need_E.numel()), True)[:-1])
    E = need_E.numel()
    dev = holder_K.device
    holder = holder_K  # [K] expert per candidate slot, -1 empty
    if fresh:  # staging contents from an earlier step/plan are not this block's
        holder[C:].fill_(-1)
    K = holder.numel()
    nmax = K - C
    cand = torch.arange(K, device=dev)
    # expert -> candidate slot holding it (index E collects the empty slots)
    res = torch.full((E + 1,), -1, dtype=torch.long, device=dev)
    res.scatter_(0, torch.where(holder >= 0, holder, E), cand)
    res_E = res[:E]
    hit_E = need_E & (res_E >= 0)
    miss_E = need_E & (res_E < 0)
    miss_n = torch.argsort((~miss_E).to(torch.int8), stable=True)[:n]  # misses first, by expert id
    valid_n = miss_E[miss_n]
    # victims: slots not holding a needed expert; empty/least-used cache slots, then staging
    holds_needed = (holder >= 0) & need_E[holder.clamp(min=0)]
    if cache_kind == "lfu":
        score = torch.where(holder[:C] >= 0, freq_E[holder[:C].clamp(min=0)], -1)
    else:
        score = last_use_C
    key = torch.cat([score, torch.full((nmax,), LAST_KEY, dtype=torch.long, device=dev)])
    key = torch.where(holds_needed, INF_KEY, key)
    victim_n = torch.argsort(key, stable=True)[:n]
    holder.scatter_(0, victim_n, torch.where(valid_n, miss_n, holder[victim_n]))
    dst_n = cand_slot_K[victim_n]
    # expert -> slot table: hits keep their slot, misses get their victim's
    table_E.copy_(torch.where(hit_E, cand_slot_K[res_E.clamp(min=0)].to(torch.int32), table_E))
    table_E.scatter_(0, miss_n, torch.where(valid_n, dst_n.to(torch.int32), table_E[miss_n]))
    # cache bookkeeping
    if C:
        if cache_kind == "lfu":
            freq_E.add_(need_E.long())
        else:
            used = (holder[:C] >= 0) & need_E[holder[:C].clamp(min=0)]
            last_use_C.copy_(torch.where(used, tick, last_use_C))
            tick.add_(1)
    hits.add_(hit_E.sum())
    lookups.add_(need_E.sum())
    copied.add_(valid_n.sum())
    plan_src[:n].copy_(torch.where(valid_n, miss_n, -1))  # -1: nothing to copy
    plan_dst[:n].copy_(dst_n)
    return plan_src[:n], plan_dst[:n]


def _lookup_reference(table_VK: torch.Tensor, tokens_N: torch.Tensor, out_NK: torch.Tensor) -> torch.Tensor:
    """ids = table[tokens] (the first-block guess: expert ids per token), written to out and returned."""
    return out_NK.copy_(table_VK.index_select(0, tokens_N.reshape(-1).long()))


def _check_lookup(lookup) -> None:
    table, tokens, out = lookup
    if table.dim() != 2 or table.dtype not in (torch.int32, torch.int64) or not table.is_contiguous():
        raise ValueError(f"plan_slots: lookup's table must be contiguous int32/int64 [V, k], got {table.dtype} "
                         f"{tuple(table.shape)}")
    if tokens.dtype not in (torch.int32, torch.int64) or not tokens.is_contiguous():
        raise ValueError(f"plan_slots: lookup's tokens must be contiguous int32/int64, got {tokens.dtype}")
    if out.shape != (tokens.numel(), table.shape[1]) or out.dtype != table.dtype or not out.is_contiguous():
        raise ValueError(f"plan_slots: lookup's out must be contiguous {table.dtype} [{tokens.numel()}, "
                         f"{table.shape[1]}], got {out.dtype} {tuple(out.shape)}")


def _check(need_E, holder_K, cand_slot_K, table_E, last_use_C, freq_E, plan_src, plan_dst, C, n, cache_kind,
           ids) -> None:
    K, E = holder_K.numel(), need_E.numel()
    if cache_kind not in CACHE_KINDS:
        raise ValueError(f"plan_slots: cache_kind={cache_kind!r}; expected lru or lfu")
    if not 0 <= C <= K or not 0 <= n <= K - C:
        raise ValueError(f"plan_slots: need 0 <= C <= K and 0 <= n <= K - C (C={C}, n={n}, K={K})")
    if need_E.dtype != torch.bool or holder_K.dtype != torch.long or table_E.dtype != torch.int32:
        raise ValueError("plan_slots: need_E must be bool, holder_K int64 and table_E int32")
    if cand_slot_K.numel() != K or table_E.numel() != E or freq_E.numel() != E or last_use_C.numel() != C:
        raise ValueError(f"plan_slots: shapes cand_slot {tuple(cand_slot_K.shape)}, table {tuple(table_E.shape)}, "
                         f"freq {tuple(freq_E.shape)}, last_use {tuple(last_use_C.shape)} do not fit E={E}, "
                         f"C={C}, K={K}")
    if plan_src.numel() < n or plan_dst.numel() < n:
        raise ValueError(f"plan_slots: plan_src/plan_dst hold fewer than n={n} entries")
    if ids is not None and ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"plan_slots: ids must be int32 or int64, got {ids.dtype}")


# ------------------------------------------------------------------------------------------------ kernel
if HAVE_TRITON:

    @triton.jit
    def _slot_keys(holder_ptr, need_ptr, last_use_ptr, freq_ptr, offs, K, C,
                   FRESH: tl.constexpr, IS_LFU: tl.constexpr, INF: tl.constexpr, LAST: tl.constexpr):
        # Holder (after the fresh reset of the staging slots), holds-a-needed-expert and victim key of
        # candidate slots offs (slots >= K: empty, key INF, never counted).
        mask = offs < K
        h = tl.load(holder_ptr + offs, mask=mask, other=-1)
        if FRESH:
            h = tl.where(offs >= C, -1, h)
        held = h >= 0
        h0 = tl.maximum(h, 0)
        needed = held & (tl.load(need_ptr + h0, mask=mask & held, other=0) != 0)
        is_cache = offs < C
        if IS_LFU:
            score = tl.load(freq_ptr + h0, mask=is_cache & held, other=-1)
        else:
            score = tl.load(last_use_ptr + offs, mask=is_cache, other=-1)
        key = tl.where(is_cache, score, LAST)
        key = tl.where(needed | (offs >= K), INF, key)
        return h, needed, key

    @triton.jit
    def _plan_slots_kernel(
        need_ptr, ids_ptr, holder_ptr, cand_ptr, table_ptr, last_use_ptr, freq_ptr,
        tick_ptr, hits_ptr, lookups_ptr, copied_ptr, src_ptr, dst_ptr, tok_ptr, ids_out_ptr,
        E, K, C, n, R, KK,
        FROM_IDS: tl.constexpr, LOOKUP: tl.constexpr, FRESH: tl.constexpr, IS_LFU: tl.constexpr,
        HAS_CACHE: tl.constexpr,
        INF: tl.constexpr, LAST: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr, CHUNK_R: tl.constexpr,
    ):
        # One program. Every read of state the plan mutates happens before the first barrier; the
        # misses' copy sources go through plan_src (second barrier) to meet their victims.
        offs_e = tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        if FROM_IDS:  # need_E[e] = any(ids == e), written for the gathers below
            cnt = tl.zeros([BLOCK_E], dtype=tl.int32)
            offs_r = tl.arange(0, CHUNK_R)
            for r0 in range(0, R, CHUNK_R):
                rr = r0 + offs_r
                if LOOKUP:  # ids = table[tokens] ([V, KK] and [R / KK]), also written out (the guess to verify)
                    tok = tl.load(tok_ptr + rr // KK, mask=rr < R, other=0).to(tl.int64)
                    ids = tl.load(ids_ptr + tok * KK + rr % KK, mask=rr < R, other=-1)
                    tl.store(ids_out_ptr + rr, ids, mask=rr < R)
                else:
                    ids = tl.load(ids_ptr + rr, mask=rr < R, other=-1)
                cnt += tl.sum((ids[None, :] == offs_e[:, None]).to(tl.int32), axis=1)
            tl.store(need_ptr + offs_e, (cnt > 0).to(tl.uint8), mask=mask_e)
            tl.debug_barrier()
        need_e = mask_e & (tl.load(need_ptr + offs_e, mask=mask_e, other=0) != 0)

        # phase 1: reads. Victim rank of each slot (stable: ties to the lower slot), residency per expert
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        h_k, needed_k, key_k = _slot_keys(holder_ptr, need_ptr, last_use_ptr, freq_ptr, offs_k, K, C,
                                          FRESH, IS_LFU, INF, LAST)
        vrank = tl.zeros([BLOCK_K], dtype=tl.int32)
        resident = tl.zeros([BLOCK_E], dtype=tl.int32)
        offs_c = tl.arange(0, CHUNK_K)
        for c0 in range(0, K, CHUNK_K):
            oc = c0 + offs_c
            h_c, needed_c, key_c = _slot_keys(holder_ptr, need_ptr, last_use_ptr, freq_ptr, oc, K, C,
                                              FRESH, IS_LFU, INF, LAST)
            ok_c = oc < K
            before = (key_c[None, :] < key_k[:, None]) | \
                ((key_c[None, :] == key_k[:, None]) & (oc[None, :] < offs_k[:, None]))
            vrank += tl.sum((before & ok_c[None, :]).to(tl.int32), axis=1)
            resident += tl.sum((h_c[None, :] == offs_e[:, None]).to(tl.int32), axis=1)
        miss_e = need_e & (resident == 0)
        miss_i = miss_e.to(tl.int32)
        mrank = tl.cumsum(miss_i, axis=0) - miss_i  # misses by expert id
        nmiss = tl.sum(miss_i, axis=0)
        n_hit = tl.sum((need_e & (resident > 0)).to(tl.int32), axis=0)
        n_need = tl.sum(need_e.to(tl.int32), axis=0)
        tick = tl.load(tick_ptr)
        hits = tl.load(hits_ptr)
        lookups = tl.load(lookups_ptr)
        copied = tl.load(copied_ptr)
        if IS_LFU and HAS_CACHE:
            freq_e = tl.load(freq_ptr + offs_e, mask=mask_e, other=0)
        tl.debug_barrier()

        # phase 2: the first n misses into plan_src (-1 past the misses), counters, LFU counts, tick
        tl.store(src_ptr + mrank, offs_e.to(tl.int32), mask=miss_e & (mrank < n))
        tl.store(src_ptr + offs_k, tl.full([BLOCK_K], -1, tl.int32), mask=(offs_k < n) & (offs_k >= nmiss))
        tl.store(hits_ptr, hits + n_hit.to(tl.int64))
        tl.store(lookups_ptr, lookups + n_need.to(tl.int64))
        tl.store(copied_ptr, copied + tl.minimum(nmiss, n).to(tl.int64))
        if HAS_CACHE:
            if IS_LFU:
                tl.store(freq_ptr + offs_e, freq_e + 1, mask=need_e)
            else:
                tl.store(tick_ptr, tick + 1)
        tl.debug_barrier()

        # phase 3: victims take their misses; copy list, holders, table, LRU ticks
        victim = mask_k & (vrank < n)
        src = tl.load(src_ptr + vrank, mask=victim, other=-1)
        valid = src >= 0
        slot = tl.load(cand_ptr + offs_k, mask=mask_k, other=0).to(tl.int32)
        tl.store(dst_ptr + vrank, slot, mask=victim)
        new_h = tl.where(valid, src.to(tl.int64), h_k)
        tl.store(holder_ptr + offs_k, new_h, mask=mask_k)
        tl.store(table_ptr + tl.maximum(h_k, 0), slot, mask=mask_k & needed_k)  # hits keep their slot
        tl.store(table_ptr + tl.maximum(src, 0), slot, mask=valid)  # misses get their victim's
        if HAS_CACHE and not IS_LFU:
            lru = mask_k & (offs_k < C) & (new_h >= 0)
            used = lru & (tl.load(need_ptr + tl.maximum(new_h, 0), mask=lru, other=0) != 0)
            tl.store(last_use_ptr + offs_k, tl.zeros([BLOCK_K], dtype=tl.int64) + tick, mask=used)


def plan_slots(
    need_E: torch.Tensor,
    holder_K: torch.Tensor,
    cand_slot_K: torch.Tensor,
    table_E: torch.Tensor,
    last_use_C: torch.Tensor,
    freq_E: torch.Tensor,
    tick: torch.Tensor,
    hits: torch.Tensor,
    lookups: torch.Tensor,
    copied: torch.Tensor,
    plan_src: torch.Tensor,
    plan_dst: torch.Tensor,
    *,
    C: int,
    n: int,
    cache_kind: str = "lru",
    fresh: bool = True,
    ids: torch.Tensor | None = None,
    lookup: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the needed experts of one block in its candidate slots; returns (plan_src[:n], plan_dst[:n]).

    need_E [E] bool: the experts to place; with `ids` (any shape, int32/int64 expert ids, e.g. a
    Routing's ids; an id < 0 names none) it is an output instead, written as need_E[e] = any(ids == e).
    holder_K [K] int64 (mutated): expert per candidate slot (C cache slots, then K - C staging slots),
    -1 empty. cand_slot_K [K] int64: candidate slot -> physical slot. table_E [E] int32 (mutated): expert
    -> physical slot. last_use_C [C] int64 (mutated, lru), freq_E [E] int64 (mutated, lfu), tick 0-d
    int64 (mutated, lru with C > 0), hits/lookups/copied 0-d int64 (mutated). plan_src/plan_dst [>= n]
    int32 (out): copy expert plan_src[j] into slot plan_dst[j] where plan_src[j] >= 0.
    C cache slots; n: the most misses copied (victims taken). fresh: the staging holders are emptied
    first. lookup (table [V, k], tokens [N], out [N, k]; contiguous, int32/int64, out of the table's dtype): instead
    of ids, ids = table[tokens] looked up by the plan itself and written to out (the first-block guess: one launch
    fewer at the decode step's start). impl: 'auto' (the kernel on CUDA; on CPU under TRITON_INTERPRET=1 with
    PGMOE_FORCE_TRITON=1), 'triton' or 'reference'. The kernel path synchronises nothing and allocates nothing
    (ids should be contiguous).
    """
    impl = impl or DEFAULT_IMPL
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"plan_slots: impl={impl!r}; expected auto, triton or reference")
    if lookup is not None:
        if ids is not None:
            raise ValueError("plan_slots: ids and lookup are exclusive")
        _check_lookup(lookup)
    if impl == "reference" or (impl == "auto" and not use_triton(holder_K)):
        return plan_slots_reference(
            need_E, holder_K, cand_slot_K, table_E, last_use_C, freq_E, tick, hits, lookups, copied,
            plan_src, plan_dst, C=C, n=n, cache_kind=cache_kind, fresh=fresh, ids=ids, lookup=lookup,
        )
    if not HAVE_TRITON:
        raise RuntimeError("plan_slots: impl='triton' needs triton")
    _check(need_E, holder_K, cand_slot_K, table_E, last_use_C, freq_E, plan_src, plan_dst, C, n, cache_kind, ids)
    for name, t in (("holder_K", holder_K), ("cand_slot_K", cand_slot_K), ("table_E", table_E),
                    ("last_use_C", last_use_C), ("freq_E", freq_E), ("plan_src", plan_src), ("plan_dst", plan_dst)):
        if not t.is_contiguous():
            raise ValueError(f"plan_slots: {name} must be contiguous")
    if plan_src.dtype != torch.int32 or plan_dst.dtype != torch.int32:
        raise ValueError("plan_slots: plan_src and plan_dst must be int32")
    E, K = need_E.numel(), holder_K.numel()
    need_u8 = need_E.view(torch.uint8)
    ids_R = ids.reshape(-1) if ids is not None else need_u8
    R = ids_R.numel() if ids is not None else 0
    tok, ids_out, KK = need_u8, need_u8, 1  # placeholders
    if lookup is not None:
        ids_R, tok, ids_out = lookup[0], lookup[1].reshape(-1), lookup[2]
        KK = lookup[0].shape[1]
        R = tok.numel() * KK
    BLOCK_E, BLOCK_K = triton.next_power_of_2(max(E, 2)), triton.next_power_of_2(max(K, 2))
    if holder_K.is_cuda:  # keep the pairwise tiles ([BLOCK_K or BLOCK_E, CHUNK]) in registers
        chunk_k = max(1, min(BLOCK_K, 4096 // max(BLOCK_K, BLOCK_E)))
        chunk_r = max(1, min(triton.next_power_of_2(max(R, 1)), 4096 // BLOCK_E))
    else:  # the interpreter: few, wide steps
        chunk_k, chunk_r = BLOCK_K, min(triton.next_power_of_2(max(R, 1)), 1024)
    _plan_slots_kernel[(1,)](  # placeholders for unused pointers: never null (an empty tensor's may be)
        need_u8, ids_R, holder_K, cand_slot_K, table_E, last_use_C if C else holder_K, freq_E,
        tick, hits, lookups, copied, plan_src, plan_dst, tok, ids_out,
        E, K, C, n, R, KK,
        FROM_IDS=ids is not None or lookup is not None, LOOKUP=lookup is not None, FRESH=bool(fresh),
        IS_LFU=cache_kind == "lfu", HAS_CACHE=C > 0,
        INF=INF_KEY, LAST=LAST_KEY,
        BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K, CHUNK_K=chunk_k, CHUNK_R=chunk_r,
        num_warps=4,
    )
    return plan_src[:n], plan_dst[:n]


# --------------------------------------------------------------------------------------------- self-check
# plan_slots' positional tensors, in order
STATE_NAMES = ("need_E", "holder_K", "cand_slot_K", "table_E", "last_use_C", "freq_E", "tick", "hits", "lookups",
               "copied", "plan_src", "plan_dst")


def random_state(E: int, C: int, nmax: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state (CPU) a runner can reach: distinct experts in the slots, some empty; ties among the
    keys. For self_check and the tests."""
    K = C + nmax
    holder = torch.full((K,), -1, dtype=torch.long)
    perm = torch.randperm(E, generator=g)[: min(E, K)]
    holder[torch.randperm(K, generator=g)[: perm.numel()]] = perm
    holder[torch.rand(K, generator=g) < 0.3] = -1

    def scalar(hi: int) -> torch.Tensor:
        return torch.randint(0, hi, (), generator=g)

    return dict(
        need_E=torch.zeros(E, dtype=torch.bool),
        holder_K=holder,
        cand_slot_K=torch.randperm(4 * K + 7, generator=g)[:K],
        table_E=torch.randint(0, 1000, (E,), generator=g, dtype=torch.int32),
        last_use_C=torch.randint(-1, 5, (C,), generator=g),
        freq_E=torch.randint(0, 4, (E,), generator=g),
        tick=scalar(5) + 5,
        hits=scalar(100),
        lookups=scalar(100) + 100,
        copied=scalar(100),
        plan_src=torch.randint(-1, E, (nmax,), generator=g, dtype=torch.int32),
        plan_dst=torch.randint(0, 1000, (nmax,), generator=g, dtype=torch.int32),
    )


def self_check(device: str | torch.device, seed: int = 0) -> str | None:
    """Run the kernel against the reference on `device` over random plan sequences (LRU/LFU, with and
    without cache, needs from ids (some < 0) and from a mask, fresh or not); None if every mutated tensor and
    output matched bitwise after every step, else a message naming the first mismatch or the error.
    Benchmarks call it first on the GPU, where the tests (interpreted on the CPU) do not reach."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    names = STATE_NAMES
    try:
        for E, C, n, kind in ((128, 0, 1, "lru"), (128, 32, 4, "lfu"), (128, 4, 16, "lru"), (8, 4, 4, "lfu"),
                              (256, 64, 8, "lru")):
            ref = random_state(E, C, n + 2, g)
            ker = {k: v.clone().to(device) for k, v in ref.items()}
            for step in range(6):
                ids = torch.randint(0, E, (max(1, n // 2) + step, 2), generator=g) if step != 3 else \
                    torch.randperm(E, generator=g)[: min(E, 2 * n + 1)]
                fresh = step == 0 or bool(torch.rand((), generator=g) < 0.5)
                use_ids = step % 2 == 1
                if step == 5:  # ids < 0 name no expert (a first-block guess not made)
                    ids = torch.where(torch.rand(ids.shape, generator=g) < 0.3, -1, ids)
                if not use_ids:
                    ref["need_E"].zero_().index_fill_(0, ids.reshape(-1), True)
                    ker["need_E"].copy_(ref["need_E"])
                kw = dict(C=C, n=n, cache_kind=kind, fresh=fresh)
                if step == 4:  # the guess's lookup: ids = table[tokens] in the plan
                    kk = 1 if n == 1 else 2
                    table = torch.randint(-1, E, (50, kk), generator=g, dtype=torch.int32)
                    tokens = torch.randint(0, 50, (max(1, n // 2) + step,), generator=g)
                    out_r = torch.empty(tokens.numel(), kk, dtype=torch.int32)
                    src_r, dst_r = plan_slots_reference(*(ref[k] for k in names), lookup=(table, tokens, out_r), **kw)
                    out_k = torch.empty(tokens.numel(), kk, dtype=torch.int32, device=device)
                    src_k, dst_k = plan_slots(*(ker[k] for k in names), lookup=(table.to(device), tokens.to(device),
                                                                                 out_k), impl="triton", **kw)
                    if not torch.equal(out_r, out_k.cpu()):
                        return f"slot plan kernel != reference: looked-up ids (E={E}, C={C}, n={n}, {kind})"
                else:
                    src_r, dst_r = plan_slots_reference(*(ref[k] for k in names), ids=ids if use_ids else None,
                                                        **kw)
                    src_k, dst_k = plan_slots(*(ker[k] for k in names), ids=ids.to(device) if use_ids else None,
                                              impl="triton", **kw)
                for k in names:
                    if not torch.equal(ref[k], ker[k].cpu()):
                        return f"slot plan kernel != reference: {k} (E={E}, C={C}, n={n}, {kind}, step {step})"
                if not (torch.equal(src_r, src_k.cpu()) and torch.equal(dst_r, dst_k.cpu())):
                    return f"slot plan kernel != reference: plan (E={E}, C={C}, n={n}, {kind}, step {step})"
    except Exception as e:  # a compile or launch failure is a failed check, reported, not raised
        return f"slot plan kernel failed: {type(e).__name__}: {str(e)[:300]}"
    return None
