"""Offload policies: which experts to copy into GPU slots, and when.

| policy       | copies at block m                                   | needs                     |
| ------------ | --------------------------------------------------- | ------------------------- |
| gpu_only     | nothing (all experts on the GPU)                    |                           |
| on_demand    | block m's routed experts, after m's gate            |                           |
| prefetch_all | all experts of block m+1, during block m            |                           |
| pregated     | block m+1's pre-gated experts, during block m       | a pre-gated model         |
| lookahead    | block m+L's pre-gated experts, during block m       | a model with lookahead L>1|
| speculative  | block m+1's router on block m's FFN input; misses   | an unconverted model      |
|              | fetched on demand (outputs unchanged)               |                           |

First-block guess (pregated, lookahead; offload.first_block_guess): no pre-gate routes the decoder's first
MoE block (its own router decides, a few layers into the step), so its copy would sit on the step's
critical path. The runner guesses that block's experts from the step's tokens (a per-token table: the
expert the token was last routed to; no guess for a token not seen yet, as a missed guess's copy delays the
needed one) and starts their copies at the step's start. At the block the router's real choice is
verified against the guess and a miss is copied then (the outputs never change, only the time; the table
learns the step's tokens' experts). keep (the default): the
engine keeps the table across runs (requests); run: each run starts with an empty one; off. The shipped
model's first decoder MoE block routes by token identity alone: every guess of a seen token hits there
(scripts/probe_first_block_guess.py, bench/results/first-block-guess.md).

Each CPU policy can put an LRU or LFU cache of C slots per block in front of the copies. Names in
lists may carry the cache: `on_demand@lru4`, `pregated@lfu2`.

A placement plan is a handful of tensor operations on the compute device (no host sync):
need_E (experts the block's tokens use) -> hits (resident in the block's cache or staging slots),
misses (copied into victims: empty or least recently / frequently used cache slots first, then
staging slots) -> the block's expert->slot table. Legend as in infer/offload.py.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from infer import cpu_compute as cc
from infer.offload import CopySettings, ExpertStore, OffloadError, SlotPool
from kernels.greedy import EarlyGuess
from kernels.slot_plan import plan_slots
from models.moe import Routing, gate_logits, routing_from_logits

GUESS_MODES = ("keep", "run", "off")


def guess_mode(value) -> str:
    """offload.first_block_guess: keep (the default; true), run or off (false)."""
    if value is True or value is None or str(value).lower() == "true":
        return "keep"
    if value is False or str(value).lower() == "false":
        return "off"
    if str(value) not in GUESS_MODES:
        raise OffloadError(f"offload.first_block_guess={value!r}; expected keep (the guess table outlives a run: "
                           "the engine keeps it), run (each run starts a new one) or off")
    return str(value)


def guess_lookup_in_plan() -> bool:
    """Whether the first-block guess is looked up by the slot plan's kernel (table[tokens] inside the plan, the
    default) or by an index_select launched ahead of it (PGMOE_GUESS_LOOKUP=0; the bench's variant #guessindex)."""
    return os.environ.get("PGMOE_GUESS_LOOKUP", "1") != "0"


POLICIES = ("gpu_only", "on_demand", "prefetch_all", "pregated", "lookahead", "speculative")
CACHE_KINDS = ("lru", "lfu")


@dataclass(frozen=True)
class PolicySpec:
    name: str
    cache_size: int = 0
    cache_kind: str = "lru"

    @property
    def label(self) -> str:
        return self.name if self.cache_size == 0 else f"{self.name}@{self.cache_kind}{self.cache_size}"

    @classmethod
    def parse(cls, text: str, cache_size: int = 0, cache_kind: str = "lru") -> PolicySpec:
        """'pregated', or 'on_demand@lru4' (the suffix overrides the cache settings)."""
        name, _, cache = str(text).partition("@")
        if cache:
            kind = cache[:3]
            if kind not in CACHE_KINDS or not cache[3:].isdigit():
                raise OffloadError(f"policy {text!r}: the cache suffix must read like @lru4 or @lfu2")
            cache_kind, cache_size = kind, int(cache[3:])
        spec = cls(name, int(cache_size), cache_kind)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.name not in POLICIES:
            raise OffloadError(f"unknown policy {self.name!r}; known: {', '.join(POLICIES)}")
        if self.cache_kind not in CACHE_KINDS:
            raise OffloadError(f"cache.kind={self.cache_kind!r}; expected lru or lfu")
        if self.cache_size < 0:
            raise OffloadError(f"cache.size must be >= 0, got {self.cache_size}")
        if self.name == "gpu_only" and self.cache_size:
            raise OffloadError("gpu_only keeps every expert on the GPU; a cache makes no sense there")


class _Block:
    """Per-block placement state: an ExpertSource for models.moe.SparseMLP."""

    def __init__(self, runner: OffloadRunner, m: int):
        self.r, self.m = runner, m

    def prefetch(self, routing: Routing) -> None:
        self.r.on_prefetch(self.m, routing)

    def observe(self, x_BSD: torch.Tensor) -> None:
        self.r.on_observe(self.m, x_BSD)

    def fetch(self, routing: Routing):
        return self.r.on_fetch(self.m, routing)

    def chunks(self, routing: Routing):
        return self.r.on_chunks(self.m, routing)

    def split(self, x_BSD: torch.Tensor, routing: Routing):
        return self.r.on_split(self.m, x_BSD, routing)

    def step_start(self, tokens_B: torch.Tensor) -> None:
        self.r.on_step_start(tokens_B)


def check_cpu_compute(store: ExpertStore, cpu_compute: str) -> None:
    if store.compress and cpu_compute != "off":
        raise OffloadError(f"offload.cpu_compute={cpu_compute} with offload.compress={store.compress}: the CPU "
                           "computes experts from their stored weights, which are packed here; use "
                           "offload.cpu_compute=off or offload.compress=none")
    if store.quantize and cpu_compute != "off":
        raise OffloadError(f"offload.cpu_compute={cpu_compute} with offload.quantize={store.quantize}: the CPU "
                           "computes experts from float weights only; use offload.cpu_compute=off or "
                           "offload.quantize=none")


class OffloadRunner:
    """Attaches a policy to a model whose experts live in an ExpertStore."""

    def __init__(
        self,
        model,
        store: ExpertStore,
        spec: PolicySpec,
        device,
        *,
        n_enc: int,
        n_dec: int,
        copy_mode: str = "auto",
        cpu_compute: str = "off",
        calibration: cc.Calibration | None = None,
        prefill_slots: int = 16,
        copy: CopySettings | None = None,
        first_block_guess: str = "keep",
        guess_tables: dict[int, torch.Tensor] | None = None,
    ):
        spec.validate()
        first_block_guess = guess_mode(first_block_guess)
        if prefill_slots < 1:
            raise OffloadError(f"offload.prefill_slots must be >= 1, got {prefill_slots}")
        if cpu_compute not in cc.MODES:
            raise OffloadError(f"offload.cpu_compute={cpu_compute!r}; expected one of {', '.join(cc.MODES)}")
        check_cpu_compute(store, cpu_compute)
        if cpu_compute == "auto" and calibration is None:
            raise OffloadError("offload.cpu_compute=auto needs a calibration (infer.cpu_compute.calibrate)")
        if spec.name == "gpu_only":
            raise OffloadError("gpu_only needs no OffloadRunner")
        cfg = model.cfg
        if spec.name in ("pregated", "lookahead") and not cfg.pregated:
            raise OffloadError(
                f"policy {spec.name!r} needs a pre-gated model (config.json has pregated=false): this is an "
                "unconverted Switch model. Fine-tune it with pre-gates (python -m train), or run it with "
                "policy=on_demand, prefetch_all or speculative"
            )
        if spec.name == "lookahead" and cfg.lookahead < 2:
            raise OffloadError(
                f"policy 'lookahead' needs a model fine-tuned with lookahead >= 2 "
                f"(this one has lookahead={cfg.lookahead}); use policy=pregated"
            )
        if spec.name == "pregated" and cfg.lookahead != 1:
            raise OffloadError(
                f"this model was fine-tuned with lookahead={cfg.lookahead}; use policy=lookahead"
            )
        self.model, self.store, self.spec = model, store, spec
        self.device = torch.device(device)
        self.E, self.C = store.E, spec.cache_size
        n_enc_moes = len(model.encoder.moes)
        self.stack_of = [0] * n_enc_moes + [1] * len(model.decoder.moes)
        self.first_of = [0, n_enc_moes]
        self.last_of = [n_enc_moes - 1, store.M - 1]
        # slots each plan may need: all E for prefetch_all; tokens x k otherwise (k = 1 in Switch)
        if spec.name == "prefetch_all":
            n_enc = n_dec = self.E
        self.n_of = [min(self.E, n_enc), min(self.E, n_dec)]
        # The encoder pass (many tokens) may route to every expert of a block, the decode step to a
        # few: the encoder's blocks stream their experts through a small double-buffered region of
        # prefill_slots slots, in chunks (one host sync per block), so that the staging buffers only
        # need the decode step's slots; the two share their slots (SlotPool). prefetch_all needs all E
        # slots per block anyway.
        # With CPU compute of misses active the encoder's blocks keep their whole-block plans (its CPU
        # choice is made per plan): the pool is then sized for the prefill as before.
        # CPU compute of misses: active unless off, or auto with the CPU never predicted faster
        self.cpu_compute, self.calibration = cpu_compute, calibration
        self.cpu_active = cpu_compute == "always" or (cpu_compute == "auto" and calibration.cpu_wins(1))
        self.stream_enc = spec.name != "prefetch_all" and self.n_of[0] > self.n_of[1] and not self.cpu_active
        if self.stream_enc:
            nbuf = 2 if prefill_slots >= 2 else 1
            chunk = prefill_slots // nbuf
            if chunk * nbuf >= self.n_of[0]:  # one chunk holds every expert a block can need
                nbuf, chunk = 1, self.n_of[0]
            self.n_of[0] = self.n_of[1]  # the encoder's blocks do not use the staging buffers
        else:
            nbuf, chunk = 0, 0
        self.prefill_bufs, self.prefill_chunk = nbuf, chunk
        ring = (cfg.lookahead + 1) if spec.name in ("pregated", "lookahead") else 2
        self.ring = ring
        self.pool = SlotPool(store, self.device, self.C, max(self.n_of), ring, copy_mode, nbuf * chunk, copy)
        dev = self.device
        M, C, n = store.M, self.C, max(self.n_of)
        self.prefill_slot = [
            self.pool.prefill_base + b * chunk + torch.arange(chunk, device=dev) for b in range(nbuf)
        ]
        self.prefill_src = [torch.full((chunk,), -1, dtype=torch.int32, device=dev) for _ in range(nbuf)]
        self.prefill_dst = [s.to(torch.int32) for s in self.prefill_slot]
        # candidate slots of block m: its C cache slots, then the n slots of its staging buffer
        self.cand_slot = []
        for m in range(M):
            r = (m - self.first_of[self.stack_of[m]]) % ring
            cache = torch.arange(m * C, (m + 1) * C)
            stage = M * C + r * n + torch.arange(n)
            self.cand_slot.append(torch.cat([cache, stage]).to(dev))
        self.holder = [
            torch.full((C + n,), -1, dtype=torch.long, device=dev) for _ in range(M)
        ]  # expert per slot
        self.last_use = [torch.full((C,), -1, dtype=torch.long, device=dev) for _ in range(M)]  # LRU
        self.freq = [torch.zeros(self.E, dtype=torch.long, device=dev) for _ in range(M)]  # LFU
        self.table = [torch.zeros(self.E, dtype=torch.int32, device=dev) for _ in range(M)]
        # persistent plan buffers (the copy stream reads them; no cross-stream temporaries)
        self.plan_src = [torch.zeros(n, dtype=torch.int32, device=dev) for _ in range(M)]
        self.plan_dst = [torch.zeros(n, dtype=torch.int32, device=dev) for _ in range(M)]
        self.tick = torch.zeros((), dtype=torch.long, device=dev)
        self.copied = torch.zeros((), dtype=torch.long, device=dev)
        self.hits = torch.zeros((), dtype=torch.long, device=dev)
        self.lookups = torch.zeros((), dtype=torch.long, device=dev)
        self.all_E = torch.ones(self.E, dtype=torch.bool, device=dev)
        self._prefetched: set[int] = set()
        # (block, need): need is a bool mask [E] or expert ids (any shape; < 0: none), see _plan
        self._pending: list[tuple[int | None, torch.Tensor]] = []
        # per block: the mask the slot-plan kernel writes when it is given ids (one kernel instead of the mask's
        # zeros + index_fill ahead of it)
        self._need_buf = [torch.zeros(self.E, dtype=torch.bool, device=dev) for _ in range(M)]
        self._observed: tuple[int, torch.Tensor] | None = None
        self.moes = model.moes
        # the first-block guess (module docstring): the decoder's blocks that no pre-gate routes
        self.guess_blocks = (
            [m for m in range(n_enc_moes, M) if self.moes[m].uses_own_router]
            if first_block_guess != "off" and spec.name in ("pregated", "lookahead") else []
        )
        self.guess_mode = first_block_guess
        # keep: the tables in guess_tables (the engine's: they outlive the run); run: this run's own, reset
        # with the placement. A token's entry: the expert it was last routed to, -1 before it was seen (no guess:
        # a missed guess costs a copy ahead of the needed one)
        kept = guess_tables if first_block_guess == "keep" and guess_tables is not None else {}
        V = model.shared.weight.shape[0]
        self.guess_table: dict[int, torch.Tensor] = {}
        for m in self.guess_blocks:
            t = kept.get(m)
            if t is None or t.shape != (V, 1) or t.device != dev:
                t = kept[m] = torch.full((V, 1), -1, dtype=torch.int32, device=dev)
            self.guess_table[m] = t
        # the early guess (infer.offload.DmaCopier.enable_early): one-row greedy decoding hands the next step's guess
        # to the dma copier as it chooses the token, where the guess's plan is predictable (one entry, no cache
        # slots: a fresh plan puts it in the block's first staging slot). GraphStep hands it to the choice
        # (models.generate.GreedySelect.early); PGMOE_EARLY_GUESS=0 turns it off (bench variant #noearly)
        self.early_guess = None
        if (self.guess_blocks and self.C == 0 and self.n_of[1] == 1 and self.pool.dma is not None
                and os.environ.get("PGMOE_EARLY_GUESS", "1") != "0"):
            m0 = self.guess_blocks[0]
            got = self.pool.dma.enable_early(m0, int(self.cand_slot[m0][self.C]))
            if got is not None:
                self.early_guess = EarlyGuess(self.guess_table[m0], *got)
        self.guess_hits = torch.zeros((), dtype=torch.long, device=dev)
        self.guess_lookups = torch.zeros((), dtype=torch.long, device=dev)  # guesses made
        self.guess_rows = torch.zeros((), dtype=torch.long, device=dev)  # token rows at the guess blocks
        self._guessed: dict[int, torch.Tensor] = {}  # block -> the guessed ids [N, 1] for the coming block
        self._guess_tokens: torch.Tensor | None = None  # this step's tokens [N] (what the table learns)
        self.cpu_computed = torch.zeros((), dtype=torch.long)  # experts (per block and step), host
        self.cpu_tokens = torch.zeros((), dtype=torch.long)  # token slots computed on the host
        self._cpu_of: dict[int, tuple[torch.Tensor, list[int]]] = {}

    # -- attach / state ------------------------------------------------------------------------
    def attach(self) -> OffloadRunner:
        for m, moe in enumerate(self.moes):
            moe.expert_source = _Block(self, m)
        return self

    def detach(self) -> None:
        """Give the model its own experts back; stop the pool's copier (raises where its copies failed)."""
        for moe in self.moes:
            moe.expert_source = None
        self.pool.close()

    def clear_pending(self) -> None:
        self._guessed.clear()
        self._guess_tokens = None
        self._pending.clear()
        self._prefetched.clear()
        self._observed = None
        self._cpu_of.clear()

    def _counters(self) -> tuple[torch.Tensor, ...]:
        return (self.copied, self.hits, self.lookups, self.cpu_computed, self.cpu_tokens, self.guess_hits,
                self.guess_lookups, self.guess_rows)

    def snapshot(self) -> list[torch.Tensor]:
        """Counters and the guess tables (what a graph capture's warm-up steps must not leave behind)."""
        return [t.clone() for t in (*self._counters(), *self.guess_table.values())]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for t, v in zip((*self._counters(), *self.guess_table.values()), saved):
            t.copy_(v)

    def _placement(self) -> list[torch.Tensor]:
        return [*self.holder, *self.last_use, *self.freq, *self.table, self.tick, *self.guess_table.values()]

    def save_state(self) -> list[torch.Tensor]:
        """Counters and placement (slot holders, LRU/LFU keys, tables): everything a step changes."""
        return [t.clone() for t in (*self._counters(), *self._placement())]

    def load_state(self, saved: list[torch.Tensor]) -> None:
        for t, v in zip((*self._counters(), *self._placement()), saved):
            t.copy_(v)

    @contextmanager
    def no_copies(self):
        """Steps inside plan as usual (slot tables update) but launch no copies and wait for none: their
        results are wrong and must be discarded. Counters and placement are restored on exit, and the
        flag is off again."""
        saved = self.save_state()
        self.pool.skip_copies = True
        try:
            yield self
        finally:
            self.pool.skip_copies = False
            self.clear_pending()
            self.load_state(saved)

    def reset_counters(self) -> None:
        for t in self._counters():
            t.zero_()
        self.pool.stall_events.clear()
        self.pool.copy_events.clear()

    def reset(self) -> None:
        """Empty cache and staging (a cold start)."""
        self.reset_counters()
        for m in range(self.store.M):
            self.holder[m].fill_(-1)
            self.last_use[m].fill_(-1)
            self.freq[m].zero_()
        self.tick.zero_()
        if self.guess_mode == "run":
            for t in self.guess_table.values():
                t.fill_(-1)

    def stats(self) -> dict:
        lookups = int(self.lookups)
        return {
            "experts_copied": int(self.copied),
            "bytes_copied": int(self.copied) * self.store.expert_bytes,
            "cache_hits": int(self.hits),
            "expert_lookups": lookups,
            "hit_rate": (int(self.hits) / lookups) if lookups else None,
            "stall_ms": self.pool.stall_ms(),
            "copy_kernel": self.pool.copy_kernel_stats(),
            "pool_bytes": self.pool.nbytes(),
            "pool_cache_bytes": self.pool.M * self.pool.C * self.store.slot_bytes,
            "pool_staging_bytes": self.pool.R * self.pool.n * self.store.slot_bytes,
            "pool_prefill_bytes": self.pool.n_prefill * self.store.slot_bytes,
            # compressed (exp4, expv): where copies land packed (exp4: in the prefill rows when they fit)
            "landing_bytes": (self.pool.landing.numel() if self.pool.landing is not None else 0),
            "landing_in_pool": self.pool.landing_in_pool,
            # staging and prefill share slots: pool = cache + max(staging, prefill)
            "pool_slots": {
                "cache": self.pool.M * self.pool.C,
                "decode_staging": self.pool.R * self.pool.n,
                "prefill": self.pool.n_prefill,
                "shared": min(self.pool.R * self.pool.n, self.pool.n_prefill),
            },
            "copy_mode": self.pool.copy_mode,
            "copy_settings": asdict(self.pool.copy_settings),
            # copy_mode dma: the host loop's API in use (native, driver or torch: DmaCopier.api)
            "dma_api_used": self.pool.dma.api if self.pool.dma is not None else None,
            # why the API asked for could not run here (no C compiler, no libcuda), or None
            "dma_api_fallback": self.pool.dma.fallback if self.pool.dma is not None else None,
            # the native loop's slowest driver call {ms, plan, call}: where the host held the copies back
            "dma_slowest_call": self.pool.dma.slowest_call if self.pool.dma is not None else None,
            # the native loop's driver calls: count and mean host time of each kind (None: another loop)
            "dma_driver_calls": self.pool.dma.call_times() if self.pool.dma is not None else None,
            "cpu_compute": self.cpu_compute,
            "cpu_compute_active": self.cpu_active,
            "experts_cpu_computed": int(self.cpu_computed),
            "tokens_cpu_computed": int(self.cpu_tokens),
            "bytes_cpu_read": int(self.cpu_computed) * self.store.expert_bytes,
            "first_block_guess": {
                "mode": self.guess_mode if self.guess_blocks else "off",
                "blocks": list(self.guess_blocks),
                "rows": int(self.guess_rows),  # token rows at the guess blocks
                "lookups": int(self.guess_lookups),  # guesses made (rows whose token was seen before)
                "hits": int(self.guess_hits),
                "hit_rate": int(self.guess_hits) / int(self.guess_lookups) if int(self.guess_lookups) else None,
                # the dma copier's early copies of the guess and the guess plans that found theirs done (None: off)
                "early": self.pool.dma.early_counts() if self.early_guess is not None else None,
            },
        }

    # -- the first-block guess -----------------------------------------------------------------------
    def on_step_start(self, tokens: torch.Tensor) -> None:
        """A decode step starts with `tokens` [B]: start copying the guess blocks' guessed experts (a prefetch:
        under copy_mode dma the copy engines move them, and the block's verification plan, which may copy
        into the same slots, follows on the same path)."""
        if not self.guess_blocks:
            return
        flat = self._guess_tokens = tokens.reshape(-1).long()
        for m in self.guess_blocks:
            if guess_lookup_in_plan():  # the plan's kernel looks the guess up: one launch fewer ahead of the copy
                ids = torch.empty((flat.numel(), 1), dtype=torch.int32, device=flat.device)
                self._plan(m, None, fresh=True, prefetch=True, lookup=(self.guess_table[m], flat, ids), early=True)
            else:
                ids = self.guess_table[m].index_select(0, flat)  # [N, 1], -1: not guessed (the plan skips it)
                self._plan(m, ids, fresh=True, prefetch=True, early=True)
            self._guessed[m] = ids

    def _count_guess(self, m: int, routing: Routing) -> None:
        """Count block m's guess and learn the tokens' experts: ~12 small kernels, launched after the next block's
        prefetched plan (on_fetch), whose post would otherwise wait behind them (~30 us on the H200)."""
        guessed = self._guessed.pop(m)
        ids = routing.ids.reshape(guessed.shape[0], -1).to(torch.int32)
        made = (guessed >= 0).all(-1)
        self.guess_hits += ((ids == guessed).all(-1) & made).sum()
        self.guess_lookups += made.sum()
        self.guess_rows += ids.shape[0]
        self.guess_table[m].index_copy_(0, self._guess_tokens, ids)

    # -- the plan --------------------------------------------------------------------------------
    def _need(self, routing: Routing) -> torch.Tensor:
        need = torch.zeros(self.E, dtype=torch.bool, device=self.device)
        return need.index_fill_(0, routing.ids.reshape(-1).long(), True)

    def _plan(self, m: int, need: torch.Tensor | None, fresh: bool, prefetch: bool = False, behind: bool = False,
              lookup: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, early: bool = False) -> None:
        """Place the experts `need` of block m in slots (a bool mask [E], or expert ids of any shape, < 0 naming
        none, from which the plan kernel writes the mask itself), start the copies of the misses. lookup (table,
        tokens, out), need None: the ids are table[tokens], looked up by the plan and written to out.

        kernels/slot_plan.py: the same plan as one kernel (the default on CUDA) or as its PyTorch
        reference (~35 small ops; on the CPU, or PGMOE_PLAN_IMPL=reference). Hits keep their
        slot; the misses, by expert id, take the n lowest-keyed candidate slots (empty or least recently /
        frequently used cache slots, then staging; never one holding a needed expert); the expert -> slot
        table, cache bookkeeping and counters are updated on the device."""
        n = self.n_of[self.stack_of[m]]
        ids = None if need is None or need.dtype == torch.bool else need.contiguous()
        src_n, dst_n = plan_slots(
            need if need is not None and ids is None else self._need_buf[m], self.holder[m], self.cand_slot[m],
            self.table[m], self.last_use[m], self.freq[m], self.tick, self.hits, self.lookups, self.copied,
            self.plan_src[m], self.plan_dst[m], C=self.C, n=n, cache_kind=self.spec.cache_kind, fresh=fresh, ids=ids,
            lookup=lookup,
        )
        self.pool.copy(m, src_n, dst_n, prefetch=prefetch, behind=behind, early=early)

    # -- CPU compute of misses (infer/cpu_compute.py) -----------------------------------------------
    def _demand(self, m: int, routing: Routing, need: torch.Tensor, fresh: bool, behind: bool = False) -> None:
        """Block m's own plan at its fetch (need: as in _plan): its misses may be computed on the CPU instead of
        copied."""
        if self.cpu_active:
            cpu_E = self._cpu_choice(m, routing, fresh)
            if cpu_E is not None:
                need = (need if need.dtype == torch.bool else self._need(routing)) & ~cpu_E
        self._plan(m, need, fresh, behind=behind)

    def _cpu_choice(self, m: int, routing: Routing, fresh: bool) -> torch.Tensor | None:
        """The missed experts of block m to compute on the CPU ([E] bool on the device), or None.
        Reads the misses and their token counts on the host (a sync)."""
        E, C = self.E, self.C
        holder = self.holder[m] if not fresh else self.holder[m][:C]  # a fresh plan empties staging
        resident = torch.zeros(E + 1, dtype=torch.bool, device=self.device)
        resident[torch.where(holder >= 0, holder, E)] = True
        counts = torch.bincount(routing.ids.reshape(-1).long(), minlength=E)
        miss = (counts > 0) & ~resident[:E]
        counts_h, miss_h = counts.tolist(), miss.tolist()  # host sync
        if self.cpu_compute == "always":
            chosen = [e for e in range(E) if miss_h[e]]
        else:
            chosen = [e for e in range(E) if miss_h[e] and self.calibration.cpu_wins(counts_h[e])]
        if not chosen:
            return None
        cpu_E = torch.zeros(E, dtype=torch.bool, device=self.device)
        cpu_E[torch.tensor(chosen, device=self.device)] = True
        self._cpu_of[m] = (cpu_E, chosen)
        self.cpu_computed += len(chosen)
        self.cpu_tokens += sum(counts_h[e] for e in chosen)
        self.lookups.add_(len(chosen))  # looked up, missed, not copied
        return cpu_E

    def on_split(self, m: int, x_BSD: torch.Tensor, routing: Routing):
        """The device computes the resident experts (CPU-computed tokens' weights zeroed); the
        CPU computes the chosen misses from the store's host tensors; the outputs are summed."""
        got = self._cpu_of.pop(m, None)
        if got is None:
            return routing, None
        cpu_E, experts = got
        ids = routing.ids
        on_cpu = cpu_E[ids.long()]  # [N, k]
        dev_routing = Routing(ids=ids, weights=torch.where(on_cpu, 0.0, routing.weights), logits=routing.logits)
        B, S, D = x_BSD.shape
        host = torch.device("cpu")
        x_h = x_BSD.reshape(B * S, D).to(host)  # activation to the host (a sync on CUDA)
        ids_h, w_h = ids.to(host), routing.weights.to(host)
        act, dev = self.moes[m].activation, x_BSD.device

        def extra() -> torch.Tensor:  # called once the device's part is launched: the two overlap
            y_h = cc.host_experts(self.store, m, experts, x_h, ids_h, w_h, act)
            return y_h.view(B, S, D).to(dev)

        return dev_routing, extra

    def _weights(self, m: int):
        self.pool.wait(m)
        return self.pool.w_in, self.pool.w_out, self.table[m]

    def _next_in_stack(self, m: int, ahead: int = 1) -> int | None:
        t = m + ahead
        return t if t <= self.last_of[self.stack_of[m]] else None

    # -- hooks -------------------------------------------------------------------------------------
    # Stack.run calls prefetch(target) before the source block's fetch, so plans are queued here and
    # issued from on_fetch after the source block's own copies: the copy stream serves the block that
    # computes first, first.
    def _streamed(self, m: int) -> bool:
        return self.stream_enc and self.stack_of[m] == 0

    def on_chunks(self, m: int, routing: Routing):
        """None, or (block m is an encoder block streamed through the prefill slots) an iterator of
        (w_in, w_out, slot_of_expert, token ids): the experts a block's tokens need, in chunks of
        prefill_chunk experts by expert id; chunk i+1's copy is issued before chunk i's compute,
        into the other buffer, so the two overlap on CUDA. Reads the needed experts and each chunk's
        tokens on the host (a sync; the encoder pass is never graph-captured)."""
        if not self._streamed(m):
            return None
        self._prefetched.discard(m)
        self._observed = None
        return self._stream(m, routing)

    def _stream(self, m: int, routing: Routing):
        dev, pool = self.device, self.pool
        ids = routing.ids.long()  # [N, k]
        need_E = self._need(routing)
        experts = need_E.nonzero().flatten()
        n_need = experts.numel()  # host sync
        c, nbuf = self.prefill_chunk, self.prefill_bufs
        chunks = [experts[i : i + c] for i in range(0, n_need, c)]
        self.lookups.add_(n_need)
        self.copied.add_(n_need)

        def issue(i: int) -> None:
            b = i % nbuf
            ch = chunks[i]
            src = self.prefill_src[b]
            src.fill_(-1)
            src[: ch.numel()].copy_(ch.to(torch.int32))
            pool.copy(m, src, self.prefill_dst[b], done=pool.prefill_done[b])

        issue(0)
        for i, ch in enumerate(chunks):
            if nbuf > 1 and i + 1 < len(chunks):
                issue(i + 1)  # into the other buffer, whose last reader (chunk i - 1) is already issued
            pool.wait(m, done=pool.prefill_done[i % nbuf])
            slots = self.prefill_slot[i % nbuf]
            # experts off the chunk: any valid slot (their tokens are not computed, or weigh 0 when k > 1)
            table = torch.full((self.E,), pool.prefill_base + (i % nbuf) * c, dtype=torch.int32, device=dev)
            table[ch] = slots[: ch.numel()].to(torch.int32)
            in_chunk = torch.zeros(self.E, dtype=torch.bool, device=dev)
            in_chunk[ch] = True
            tok = in_chunk[ids].any(-1).nonzero().flatten()  # host sync
            yield pool.w_in, pool.w_out, table, tok, in_chunk
            if nbuf == 1 and i + 1 < len(chunks):
                issue(i + 1)

    def on_prefetch(self, m: int, routing: Routing) -> None:
        """A pre-gate routed block m early."""
        if self._streamed(m):  # streamed at its own fetch
            return
        if self.spec.name in ("pregated", "lookahead"):
            self._pending.append((m, routing.ids))

    def on_observe(self, m: int, x_BSD: torch.Tensor) -> None:
        """Block m's FFN input is known (before its experts run)."""
        if self.spec.name == "speculative":
            self._observed = (m, x_BSD)

    def on_fetch(self, m: int, routing: Routing):
        name = self.spec.name
        early = m in self._prefetched
        self._prefetched.discard(m)
        if name == "prefetch_all":
            if not early:
                self._demand(m, routing, self.all_E, fresh=True)
            self._pending.append((self._next_in_stack(m), self.all_E))
        elif name == "speculative":
            # misses of the guess are fetched now; the outputs are those of the unconverted model
            self._demand(m, routing, routing.ids, fresh=not early)
            seen, self._observed = self._observed, None
            t = self._next_in_stack(m)
            if seen is not None and seen[0] == m and t is not None:
                x_BSD = seen[1]
                B, S, D = x_BSD.shape
                guess = routing_from_logits(
                    gate_logits(x_BSD.reshape(B * S, D), self.moes[t].router), (B, S), None
                )
                self._pending.append((t, guess.ids))
        elif m in self._guessed:  # a first decoder block, its experts guessed at the step's start
            # its router decided: copy what the guess missed (counted below, after the next block's plan). Not
            # fresh: the staging holders are those its guess filled this step, after the buffer's last reader
            self._demand(m, routing, routing.ids, fresh=False, behind=True)
        elif not early:  # on_demand, or a block no pre-gate routes (the first of a stack)
            self._demand(m, routing, routing.ids, fresh=True)
        for t, need in self._pending:
            if t is not None:
                self._plan(t, need, fresh=True, prefetch=True)
                self._prefetched.add(t)
        self._pending.clear()
        if m in self._guessed:
            self._count_guess(m, routing)
        return self._weights(m)
