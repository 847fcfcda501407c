"""Sampling benchmark: ``codegpt.generate`` against transformers' ``GPT2LMHeadModel.generate`` of
identical shape (default ``DynamicCache`` and ``cache_implementation="static"``) and a naive no-cache
loop, all sampling whole images with top-k 100 from one start token.

    python bench/bench_sample.py --breakdown              # every row (the B64 rows take most of it)
    python bench/bench_sample.py --rows seed-b8 --rounds 5
    python bench/bench_sample.py --rows seed-b1 --new-tokens 256 --no-fresh --force   # a quick look

Warm figures: every contender is warmed up once, then rounds are interleaved (the order rotates) and
the median of per-round time ratios is reported. First-call figures and peak memory come from fresh
processes, one per contender: a one-shot sampling script meets a cold allocator, and transformers'
default cache is much slower then. Peak memory is the peak resident set above the one before the call
(CPU) or peak allocated memory (accelerators).

``--breakdown`` splits codegpt's decode step into weight matmuls, attention over the filled cache,
sampling and per-op overhead, by timing variants of the same call (see ``breakdown``).

The naive loop (a full forward over the whole prefix for every code, as minGPT and nanoGPT sample) is
too slow to run to the end: its time is the integral (Simpson's rule) of its step time measured at 5
prefix lengths, marked "est.".

Refuses to report while other processes load the machine (``_harness.LoadMonitor``), unless --force.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    MAX_OTHERS_BUSY,
    LoadMonitor,
    check_load,
    idle_now,
    interleave,
    median_ratio,
    peak_memory,
    run_fresh,
    time_call,
    wait_for_idle,
)

from codegpt import GPT, GPTConfig  # noqa: E402
from codegpt.sampling import generate  # noqa: E402

ROWS = {
    # name: (vocab, codes per image, embed, layers, heads, batch)
    "seed-b1": (1025, 1024, 256, 8, 8, 1),
    "seed-b8": (1025, 1024, 256, 8, 8, 8),
    "seed-b64": (1025, 1024, 256, 8, 8, 64),
    "wide-b8": (1025, 256, 512, 8, 8, 8),
    "wide-b64": (1025, 256, 512, 8, 8, 64),
}
CONTENDERS = ("codegpt", "hf-default", "hf-static", "naive")
TOP_K = 100


def build(row: str, device: str) -> tuple[GPT, torch.nn.Module, int]:
    """Both models, same shape, eval mode; returns (codegpt GPT, GPT2LMHeadModel, batch)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, seq_len, embed, layers, heads, batch = ROWS[row]
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=vocab, seq_len=seq_len, embed_dim=embed, num_layers=layers,
                         num_heads=heads)).to(device).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_positions=seq_len + 1, n_embd=embed, n_layer=layers, n_head=heads,
        bos_token_id=vocab - 1, eos_token_id=None, pad_token_id=None,
    )).to(device).eval()
    gpt2.config._attn_implementation = "sdpa"
    gc = gpt2.generation_config
    # The same sampling as codegpt's: top-k 100, the start token never sampled, no end token.
    gc.do_sample, gc.top_k, gc.suppress_tokens = True, TOP_K, [vocab - 1]
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = vocab - 1, None, None
    return ours, gpt2, batch


def contenders(ours: GPT, gpt2: torch.nn.Module, batch: int, new_tokens: int, device: str) -> dict:
    """One zero-argument callable per contender, each sampling ``batch`` sequences of ``new_tokens``."""
    start = torch.full((batch, 1), ours.config.start_token_id, dtype=torch.long, device=device)

    def hf(cache_implementation: str | None):
        def run():
            with torch.inference_mode():
                return gpt2.generate(start, max_new_tokens=new_tokens, cache_implementation=cache_implementation)
        return run

    def naive_step(t: int) -> None:
        from transformers import TopKLogitsWarper

        ids = torch.randint(0, ours.config.codebook_size, (batch, t), device=device)
        ids[:, 0] = ours.config.start_token_id
        logits = ours(ids, use_cache=False).logits[:, -1].float()
        logits[:, ours.config.codebook_size :] = -float("inf")
        torch.multinomial(TopKLogitsWarper(TOP_K)(ids, logits).softmax(-1), 1)

    def naive():
        # Simpson's rule over prefix lengths 1..new_tokens (the step time is close to quadratic in t).
        ts = [1 + round(i * (new_tokens - 1) / 4) for i in range(5)]
        with torch.inference_mode():
            s = [time_call(lambda t=t: naive_step(t), device) for t in ts]
        return (new_tokens - 1) / 12 * (s[0] + 4 * s[1] + 2 * s[2] + 4 * s[3] + s[4]) + (s[0] + s[4]) / 2

    return {
        "codegpt": lambda: generate(ours, start, max_new_tokens=new_tokens, top_k=TOP_K),
        "hf-default": hf(None),
        "hf-static": hf("static"),
        "naive": naive,
    }


def timed_rounds(calls: dict, rounds: int, device: str) -> dict[str, list[float]]:
    """``interleave``, except that the naive contender reports its own (estimated) time."""
    estimates: dict[str, list[float]] = {"naive": []}
    wrapped = dict(calls)
    wrapped["naive"] = lambda: estimates["naive"].append(calls["naive"]())
    times = interleave(wrapped, rounds, warmup=1, device=device)
    times["naive"] = estimates["naive"][-rounds:]  # drop the warm-up's estimate
    return times


def child(row: str, contender: str, new_tokens: int, device: str) -> None:
    """Fresh-process mode: time the first call of one contender and its peak memory; print JSON."""
    ours, gpt2, batch = build(row, device)
    call = contenders(ours, gpt2, batch, new_tokens, device)[contender]
    result: dict[str, float] = {}

    def first():
        t0 = time.perf_counter()
        out = call()
        result["seconds"] = out if contender == "naive" else time.perf_counter() - t0

    result["peak_bytes"] = peak_memory(first, device) or 0
    print(json.dumps(result))


def breakdown(row: str, new_tokens: int, rounds: int, device: str) -> str:
    """Where a codegpt decode step's time goes, by subtraction rather than by profiler (which adds
    its own cost to every small op and so inflates exactly the part we want to see).

    Four variants of the same sampling call, interleaved:
      full        the real call;
      no-attn     attention replaced by returning the queries (same shapes, no reads of the cache);
      tiny        the same ops on a model of width 8 (one value per head): Python, dispatch and
                  sampling over the same vocabulary, next to no arithmetic;
      tiny-greedy the same without top-k / softmax / draw.
    attention = full - no-attn; weight matmuls (and the other arithmetic) = no-attn - tiny;
    sampling = tiny - tiny-greedy; per-op overhead = tiny-greedy.
    """
    import types

    import codegpt.fast.decoder as decoder

    ours, _, batch = build(row, device)
    vocab, seq_len, _, layers, heads, _ = ROWS[row]
    tiny = GPT(GPTConfig(vocab_size=vocab, seq_len=seq_len, embed_dim=heads, num_layers=layers,
                         num_heads=heads)).to(device).eval()
    start = torch.full((batch, 1), ours.config.start_token_id, dtype=torch.long, device=device)
    no_attention = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    no_attention.scaled_dot_product_attention = lambda q, k, v, is_causal=False: q

    attend_one = decoder._attend_one

    def variant(model, top_k=TOP_K, functional=F):
        def run():
            decoder.F = functional  # the fast decoder's functional ops
            if functional is no_attention:  # the CPU's decode steps attend through _attend_one
                decoder._attend_one = lambda q, k, v: q
            try:
                return generate(model, start, max_new_tokens=new_tokens, top_k=top_k,
                                temperature=1.0 if top_k else 0.0)
            finally:
                decoder.F, decoder._attend_one = F, attend_one
        return run

    times = interleave({"full": variant(ours), "no-attn": variant(ours, functional=no_attention),
                        "tiny": variant(tiny), "tiny-greedy": variant(tiny, top_k=None)}, rounds, 1, device)
    ms = {k: 1e3 * statistics.median(v) / new_tokens for k, v in times.items()}
    parts = {
        "weight matmuls (and the other arithmetic)": ms["no-attn"] - ms["tiny"],
        "attention over the filled cache": ms["full"] - ms["no-attn"],
        "sampling (top-k warper, softmax, draw)": ms["tiny"] - ms["tiny-greedy"],
        "per-op overhead (Python, dispatch, small kernels)": ms["tiny-greedy"],
    }
    lines = [f"Per decode step, {seq_len} codes, e{ours.config.embed_dim}, B{batch}, averaged over "
             f"{new_tokens} steps: {ms['full']:.2f} ms", "", "| part | ms/step | share |", "|---|---|---|"]
    lines += [f"| {part} | {t:.2f} | {t / ms['full']:.0%} |" for part, t in parts.items()]
    return "\n".join(lines)


def shape_name(row: str) -> str:
    vocab, seq_len, embed, layers, heads, batch = ROWS[row]
    return f"{seq_len} codes, e{embed}, L{layers}, B{batch}"


def warm_row(row: str, n: int, args: argparse.Namespace) -> str:
    """Warm, interleaved timings of every contender: one markdown table row."""
    ours, gpt2, batch = build(row, args.device)
    times = timed_rounds(contenders(ours, gpt2, batch, n, args.device), args.rounds, args.device)
    tok_s = {k: batch * n / statistics.median(v) for k, v in times.items()}
    ratio = {k: median_ratio(v, times["codegpt"]) for k, v in times.items()}
    return (f"| {shape_name(row)} | {tok_s['codegpt']:.0f} | {tok_s['hf-default']:.0f} ({ratio['hf-default']:.2f}x) | "
            f"{tok_s['hf-static']:.0f} ({ratio['hf-static']:.2f}x) | {tok_s['naive']:.1f} est. "
            f"({ratio['naive']:.0f}x) |")


def fresh_row(row: str, n: int, args: argparse.Namespace) -> str:
    """First call and peak memory of every contender, each in a fresh process: one table row."""
    fresh = {}
    for name in CONTENDERS:
        argv = [__file__, "--child", row, name, "--new-tokens", str(n), "--device", args.device]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        fresh[name] = run_fresh(argv)
    first = {k: ROWS[row][5] * n / v["seconds"] for k, v in fresh.items()}
    mib = {k: v["peak_bytes"] / 2**20 for k, v in fresh.items()}
    return (f"| {shape_name(row)} | {first['codegpt']:.0f} | {first['hf-default']:.0f} "
            f"({first['codegpt'] / first['hf-default']:.2f}x) | {first['hf-static']:.0f} "
            f"({first['codegpt'] / first['hf-static']:.2f}x) | {mib['codegpt']:.0f} | {mib['hf-default']:.0f} | "
            f"{mib['hf-static']:.0f} | {mib['naive']:.0f} |")


def measured(run, what: str, args: argparse.Namespace) -> str:
    """``run()`` under a ``LoadMonitor``. With ``--wait``, a run that other processes disturbed is
    redone after the machine is idle again (up to 3 tries); otherwise, or after the last try, the
    usual refusal (or, with ``--force``, a warning appended to the result)."""
    for attempt in range(3 if args.wait else 1):
        if args.wait:
            wait_for_idle(args.wait)
        monitor = LoadMonitor()
        result = run()
        others = monitor.busy()
        if not args.wait or others is None or others <= MAX_OTHERS_BUSY or attempt == 2:
            break
        print(f"({what} disturbed: other processes used {others:.0%} of the machine; redoing it)", flush=True)
    warning = check_load(others, args.force, what)
    return result + (f" {warning}" if warning else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=None, help="codes per sample (default: a whole image)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-fresh", action="store_true", help="skip the first-call and memory runs")
    parser.add_argument("--breakdown", action="store_true",
                        help="also split codegpt's decode step into matmuls, attention, sampling, overhead")
    parser.add_argument("--force", action="store_true", help="report even when the machine is busy")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for an idle machine before each part, and redo disturbed parts")
    parser.add_argument("--child", nargs=2, metavar=("ROW", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.child:
        row = args.child[0]
        child(row, args.child[1], args.new_tokens or ROWS[row][1], args.device)
        return

    if args.wait and not wait_for_idle(args.wait):
        print(f"the machine stayed busy for {args.wait:.0f} s", flush=True)
    warning = check_load(idle_now(1.0), args.force, "an idle check before the run")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, top-k {TOP_K}, "
          f"{args.rounds} interleaved rounds after 1 warm-up; ratios are medians of per-round ratios", flush=True)
    if warning:
        print(warning)
    warm_rows, fresh_rows, breakdowns = [], [], []
    for row in args.rows:
        n = args.new_tokens or ROWS[row][1]
        warm_rows.append(measured(partial(warm_row, row, n, args), f"the timings of {row}", args))
        print(warm_rows[-1], flush=True)
        if args.breakdown:
            breakdowns.append(measured(partial(breakdown, row, n, args.rounds, args.device),
                                       f"the breakdown of {row}", args))
            print(breakdowns[-1], flush=True)
        if not args.no_fresh:
            fresh_rows.append(measured(partial(fresh_row, row, n, args), f"the first calls of {row}", args))
            print(fresh_rows[-1], flush=True)

    print("\nWarm (generated tokens/s; in brackets how many times faster codegpt is)\n")
    print("| shape | codegpt | transformers default cache | transformers static cache | naive no-cache loop |")
    print("|---|---|---|---|---|")
    print("\n".join(warm_rows))
    if fresh_rows:
        print("\nFirst call in a fresh process (tokens/s), and peak memory above the model (MiB)\n")
        print("| shape | codegpt | transformers default | transformers static | codegpt MiB | default MiB | "
              "static MiB | naive MiB (one full-length step) |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(fresh_rows))
    for text in breakdowns:
        print("\n" + text)
    check_load(idle_now(1.0), args.force, "an idle check after the run")


if __name__ == "__main__":
    main()
