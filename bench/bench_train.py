"""Training-step benchmark: codegpt's GPT against transformers' GPT2LMHeadModel of identical shape.

One step is forward + backward + AdamW on a full-length batch (start token + every code). Both models
get the same dropout, the same threads and the same batch; every contender is warmed up first, then
rounds are interleaved and the median of the per-round time ratios is reported, with peak memory.

    python bench/bench_train.py                  # fp32 and bf16 autocast, both shapes
    python bench/bench_train.py --rounds 9 --precision fp32 --shape seed
    python bench/bench_train.py --device cuda     # bf16 autocast on the accelerator's own type
    python bench/bench_train.py --compile --gradient-checkpointing   # + the speed switches against the plain step

``--compile`` and ``--gradient-checkpointing`` add a second table: codegpt's step with ``torch.compile`` (the
training step as ``codegpt train --compile`` runs it; compiled before timing) and with gradient checkpointing,
each against codegpt's plain step (time ratio: below 1 is faster), with peak memory side by side.
    python bench/bench_train.py --ema             # and the cost of an EMA of the weights (--ema-decay)

Refuses to report while other processes load the machine (see ``_harness.machine_is_idle``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import check_idle_or_exit, interleaved_medians, peak_memory_mb  # noqa: E402

from codegpt import GPT, GPTConfig  # noqa: E402
from codegpt.fast import use_cpu_kernels  # noqa: E402
from codegpt.training import make_ema  # noqa: E402

SHAPES = {
    # name: (vocab, codes per image, embed, layers, heads, batch)
    "seed": (1025, 1024, 256, 8, 8, 4),
    "wide": (1025, 256, 512, 8, 8, 16),
}


def build_models(vocab: int, seq_len: int, embed: int, layers: int, heads: int, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=vocab, seq_len=seq_len, embed_dim=embed, num_layers=layers,
                         num_heads=heads, embd_dropout=0.1, attn_dropout=0.0, resid_dropout=0.1))
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_positions=seq_len + 1, n_embd=embed, n_layer=layers, n_head=heads,
        embd_pdrop=0.1, attn_pdrop=0.0, resid_pdrop=0.1, tie_word_embeddings=False,
        bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    ))
    gpt2.config._attn_implementation = "sdpa"
    # codegpt's training loop swaps its CPU kernels in on a CPU: measure what training runs.
    if device.type == "cpu":
        use_cpu_kernels(ours)
    return {"codegpt": ours.to(device).train(), "gpt2": gpt2.to(device).train()}


def make_step(model: torch.nn.Module, ids: torch.Tensor, precision: str, forward: torch.nn.Module | None = None):
    """One training step of ``model``; ``forward`` (e.g. ``torch.compile(model)``) computes the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    forward = model if forward is None else forward

    def step() -> None:
        bf16 = torch.autocast(ids.device.type, dtype=torch.bfloat16)
        ctx = bf16 if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def switch_variants(ours: GPT, compile_: bool, checkpointing: bool
                    ) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """codegpt's model as the plain step runs it and with each switch asked for, as (model, forward): copies of
    the same weights, as ``codegpt train`` sets them up (``training._set_checkpointing``, ``torch.compile``)."""
    from codegpt.training import _set_checkpointing

    variants = {"plain": (ours, ours)}
    if compile_:
        compiled = copy.deepcopy(ours)
        variants["compile"] = (compiled, torch.compile(compiled))
    if checkpointing:
        checkpointed = copy.deepcopy(ours)
        _set_checkpointing(checkpointed, True)
        variants["gradient checkpointing"] = (checkpointed, checkpointed)
    return variants


def switch_rows(shapes: list[str], precisions: list[str], args: argparse.Namespace, device: torch.device) -> None:
    print("\n| shape | precision | switch | codegpt step (s) | vs plain | peak MB | plain peak MB |")
    print("|---|---|---|---|---|---|---|")
    for name in shapes:
        vocab, seq_len, embed, layers, heads, batch = SHAPES[name]
        ids = make_ids(vocab, seq_len, batch, device)
        for precision in precisions:
            ours = build_models(vocab, seq_len, embed, layers, heads, device)["codegpt"]
            variants = switch_variants(ours, args.compile, args.gradient_checkpointing)
            steps = {k: make_step(m, ids, precision, forward) for k, (m, forward) in variants.items()}
            for step in steps.values():
                step()  # compiles (and warms the allocator) before anything is measured
            peaks = {k: peak_memory_mb(s, device) for k, s in steps.items()}
            med, ratio = interleaved_medians(steps, args.rounds, baseline="plain", warmup=1, device=device)
            for variant in variants:
                if variant != "plain":
                    print(f"| {name} {vocab}x{seq_len} e{embed} L{layers} B{batch} | {precision} | {variant} | "
                          f"{med[variant]:.3f} (plain {med['plain']:.3f}) | {ratio[variant]:.3f} | "
                          f"{peaks[variant]:.0f} | {peaks['plain']:.0f} |", flush=True)


def make_ids(vocab: int, seq_len: int, batch: int, device: torch.device) -> torch.Tensor:
    ids = torch.randint(0, vocab - 1, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = vocab - 1
    return ids.to(device)


def make_ema_step(model: torch.nn.Module, ids: torch.Tensor, precision: str, decay: float):
    """A training step followed by the EMA update codegpt's loop makes (``ema_decay``)."""
    train_step, ema = make_step(model, ids, precision), make_ema(model, decay).to(ids.device)

    def step() -> None:
        train_step()
        ema.update_parameters(model)

    return step


def ema_rows(shapes: list[str], precisions: list[str], args: argparse.Namespace, device: torch.device) -> None:
    """codegpt's step with and without the EMA update, side by side (each on a model of its own)."""
    print(f"\nEMA of the weights (decay {args.ema_decay}): the step with the update against the step without")
    print("| shape | precision | step (s) | step + EMA (s) | time ratio | step peak MB | EMA copy MB (fp32) |")
    print("|---|---|---|---|---|---|---|")
    for name in shapes:
        vocab, seq_len, embed, layers, heads, batch = SHAPES[name]
        ids = make_ids(vocab, seq_len, batch, device)
        for precision in precisions:
            plain = build_models(vocab, seq_len, embed, layers, heads, device)["codegpt"]
            averaged = build_models(vocab, seq_len, embed, layers, heads, device)["codegpt"]
            steps = {"plain": make_step(plain, ids, precision),
                     "ema": make_ema_step(averaged, ids, precision, args.ema_decay)}
            peak = peak_memory_mb(steps["plain"], device)  # also a warm-up step
            copy_mb = sum(p.numel() for p in averaged.parameters()) * 4 / 2**20  # what the average keeps
            med, ratio = interleaved_medians(steps, args.rounds, baseline="plain", warmup=1, device=device)
            print(f"| {name} {vocab}x{seq_len} e{embed} L{layers} B{batch} | {precision} | {med['plain']:.3f} | "
                  f"{med['ema']:.3f} | {ratio['ema']:.3f} | {peak:.0f} | {copy_mb:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--precision", choices=["fp32", "bf16", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps, ... (timings synchronise the device)")
    parser.add_argument("--force", action="store_true", help="report even when the machine is busy")
    parser.add_argument("--compile", action="store_true", help="also time codegpt's step under torch.compile")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="also time codegpt's step with gradient checkpointing")
    parser.add_argument("--ema", action="store_true", help="also time the step with codegpt's EMA update")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="the EMA's decay (its cost does not depend "
                        "on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    check_idle_or_exit(args.force)

    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    precisions = ["fp32", "bf16"] if args.precision == "all" else [args.precision]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {device.type} ({name}), {args.rounds} interleaved rounds, median ratio")
    print("| shape | precision | codegpt step (s) | GPT2 step (s) | time ratio | codegpt peak MB | GPT2 peak MB |")
    print("|---|---|---|---|---|---|---|")
    for name in shapes:
        vocab, seq_len, embed, layers, heads, batch = SHAPES[name]
        ids = make_ids(vocab, seq_len, batch, device)
        for precision in precisions:
            models = build_models(vocab, seq_len, embed, layers, heads, device)
            steps = {k: make_step(m, ids, precision) for k, m in models.items()}
            peaks = {k: peak_memory_mb(s, device) for k, s in steps.items()}  # also a warm-up step each
            med, ratio = interleaved_medians(steps, args.rounds, baseline="gpt2", warmup=1, device=device)
            print(f"| {name} {vocab}x{seq_len} e{embed} L{layers} B{batch} | {precision} | "
                  f"{med['codegpt']:.3f} | {med['gpt2']:.3f} | {ratio['codegpt']:.3f} | "
                  f"{peaks['codegpt']:.0f} | {peaks['gpt2']:.0f} |", flush=True)
    if args.compile or args.gradient_checkpointing:
        switch_rows(shapes, precisions, args, device)
    if args.ema:
        ema_rows(shapes, precisions, args, device)
    check_idle_or_exit(args.force, when="after")


if __name__ == "__main__":
    main()
