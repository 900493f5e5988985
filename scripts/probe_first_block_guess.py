"""How well can the decoder's first MoE block's experts be guessed from the step's token alone?

No pre-gate routes the first MoE block of the decoder: its own router decides a few layers into the step,
so the offload runner guesses that block's experts at the step's start from the step's tokens and verifies
the guess at the block (infer/policies.py, offload.first_block_guess). A missed guess costs a copy ahead of
the needed one, so a rule may also abstain. This probe measures, on a checkpoint and a task's examples, for
each rule: coverage (positions it guesses), precision (its guesses that name the expert the block's router
then picks) and hits (positions guessed right, of all):

  embedding              the block's router applied to the token's embedding (normed as the block's input
                         is); never abstains
  last_seen_per_output   the expert the token was last routed to in this output; abstains on a token not
                         seen yet: the runner's rule under first_block_guess=run
  last_seen_across       the same table kept across the outputs, in order: first_block_guess=keep (a server
                         keeping the table)
  previous_step          the expert the previous position was routed to
  profiled               per token, the expert it was routed to most often in the train split's outputs
                         (--profile-examples of them); abstains on tokens not in them
  token_bound            per token, the expert it was routed to most often in the measured outputs
                         themselves: the best precision any rule that reads only the token could reach here

The decoder inputs are the model's own greedy outputs (--inputs greedy, as in decoding; the routing is
read from one teacher-forced pass over them) or the gold targets (--inputs gold).

  python scripts/probe_first_block_guess.py --checkpoint checkpoints/default --data docsum
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infer.report import environment  # noqa: E402
from models.checkpoint import load_switch  # noqa: E402
from models.generate import greedy  # noqa: E402
from models.moe import gate_logits  # noqa: E402
from models.tokenizer import ByteTokenizer  # noqa: E402
from train.data import build_task  # noqa: E402

RULES = ("embedding", "last_seen_per_output", "last_seen_across", "previous_step", "profiled", "token_bound")


@torch.no_grad()
def first_block_routes(model, tokenizer, examples, inputs: str, max_new_tokens: int, max_input: int):
    """Per example: (decoder input tokens [T], the first decoder MoE block's expert per position [T])."""
    out = []
    for ex in examples:
        x = torch.tensor([tokenizer.encode(ex.input, max_length=max_input)])
        if inputs == "gold":
            y = torch.tensor([tokenizer.encode(ex.target, max_length=max_new_tokens)])
        else:
            y = greedy(model, x, max_new_tokens=max_new_tokens, eos_token_id=model.cfg.eos_token_id)
            if y.shape[1] == 0:
                continue
        dec_in = model.shift_right(y)
        r = model(x, decoder_input_ids=dec_in).decoder_routings[0]
        out.append((dec_in[0].tolist(), r.ids.reshape(-1).tolist()))
    return out


@torch.no_grad()
def embedding_table(model) -> list[int]:
    """The runner's starting table: the first decoder MoE block's router on every normed token embedding."""
    block = next(b for b in model.decoder.blocks if b.sparse)
    return gate_logits(block.ff_norm(model.shared.weight), block.ff.router).argmax(-1).tolist()


def score(rows, emb: list[int], profile: dict[int, Counter]) -> dict:
    """Per rule: coverage, precision and hits (fractions) over every decoder position of `rows`."""
    hits, made = Counter(), Counter()
    n = 0
    across: dict[int, int] = {}
    in_sample: dict[int, Counter] = defaultdict(Counter)
    for toks, experts in rows:
        for t, e in zip(toks, experts):
            in_sample[t][e] += 1
    for toks, experts in rows:
        per_output: dict[int, int] = {}
        for i, (t, e) in enumerate(zip(toks, experts)):
            n += 1
            guesses = {
                "embedding": emb[t],
                "last_seen_per_output": per_output.get(t),
                "last_seen_across": across.get(t),
                "previous_step": experts[i - 1] if i > 0 else None,
                "profiled": profile[t].most_common(1)[0][0] if profile.get(t) else None,
                "token_bound": in_sample[t].most_common(1)[0][0],
            }
            for r, g in guesses.items():
                if g is not None:
                    made[r] += 1
                    hits[r] += g == e
            per_output[t] = across[t] = e
    return {"positions": n, **{
        r: {"coverage": made[r] / n if n else None, "precision": hits[r] / made[r] if made[r] else None,
            "hits": hits[r] / n if n else None} for r in RULES}}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    ap.add_argument("--data", default="docsum", help="a task config under conf/data/ (docsum, span, ...)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--examples", type=int, default=64, help="outputs measured (the split's first N)")
    ap.add_argument("--profile-examples", type=int, default=256, help="train-split outputs for `profiled`")
    ap.add_argument("--inputs", choices=("greedy", "gold"), default="greedy")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-input-tokens", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "first-block-guess"),
                    help="writes <out>.json and <out>.md")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    import yaml

    conf_path = ROOT / "conf" / "data" / f"{args.data}.yaml"
    if not conf_path.is_file():
        known = sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml"))
        raise SystemExit(f"--data {args.data!r}: no conf/data/{args.data}.yaml; known: {', '.join(known)}")
    task = build_task(yaml.safe_load(conf_path.read_text()))
    model = load_switch(args.checkpoint, dtype=torch.float32)
    tok = ByteTokenizer(model.cfg.vocab_size)
    measured = task.examples(args.split)[: args.examples]
    if not measured:
        raise SystemExit(f"split {args.split!r} of {args.data} has no examples")
    kw = dict(inputs=args.inputs, max_new_tokens=args.max_new_tokens, max_input=args.max_input_tokens)
    print(f"[probe] {len(measured)} {args.split} outputs ...", flush=True)
    rows = first_block_routes(model, tok, measured, **kw)
    profile: dict[int, Counter] = defaultdict(Counter)
    if args.profile_examples:
        print(f"[probe] profiling {args.profile_examples} train outputs ...", flush=True)
        for toks, experts in first_block_routes(model, tok, task.examples("train")[: args.profile_examples], **kw):
            for t, e in zip(toks, experts):
                profile[t][e] += 1
    result = {
        "checkpoint": str(args.checkpoint),
        "experts": model.cfg.num_experts,
        "data": args.data,
        "split": args.split,
        "outputs": len(rows),
        "inputs": args.inputs,
        "profile_outputs": args.profile_examples,
        "hit_rate": score(rows, embedding_table(model), profile),
        "environment": environment(torch.device("cpu")),
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    h = result["hit_rate"]
    lines = [
        f"# First decoder MoE block: guessing its expert from the token ({Path(args.checkpoint).name}, "
        f"{model.cfg.num_experts} experts, {args.data} {args.split}, {len(rows)} {args.inputs} outputs, "
        f"{h['positions']} positions)",
        "",
        "| rule | coverage | precision | hits (of all positions) |",
        "| --- | --- | --- | --- |",
        *[f"| {r} | {_pct(h[r]['coverage'])} | {_pct(h[r]['precision'])} | {_pct(h[r]['hits'])} |" for r in RULES],
        "",
        f"A uniform guess: {100 / model.cfg.num_experts:.1f}%. Command: `{result['environment']['command']}`",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
