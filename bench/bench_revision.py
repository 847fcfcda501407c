"""codegpt at a git revision against the working tree, side by side in one process.

A restructure must not cost speed. Timing the two trees one after the other compares two moments of a
noisy machine; this loads the revision's package under another name (``git archive`` into a
temporary folder, imported as ``codegpt_rev``), builds both models with the same weights and times
them in interleaved rounds, so the figure is the ratio ``working tree / revision`` (below 1: the
working tree is faster). Multiply the README's ratios against transformers by it.

    python bench/bench_revision.py --rev e9227da                    # training and sampling, every row
    python bench/bench_revision.py --rev main --what sample --rows seed-b8 --rounds 5

Training steps run as ``bench_train.py`` runs them (the CPU kernels applied where the tree has them);
sampling calls each tree's ``codegpt.generate`` (top-k 100, start token -> every code). Refuses to
report while other processes load the machine (see ``_harness``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _harness import check_idle_or_exit, interleaved_medians  # noqa: E402
from bench_sample import ROWS  # noqa: E402
from bench_train import SHAPES  # noqa: E402

# The rows bench_train.py and bench_sample.py measure against transformers.
TRAIN_ROWS, SAMPLE_ROWS = SHAPES, ROWS


def import_revision(rev: str, into: Path):
    """The package ``codegpt`` as it stands at ``rev``, imported as ``codegpt_rev`` (its imports are relative)."""
    archive = subprocess.run(["git", "archive", rev, "codegpt"], cwd=HERE.parent, check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    (into / "codegpt").rename(into / "codegpt_rev")
    sys.path.insert(0, str(into))
    return importlib.import_module("codegpt_rev")


def with_kernels(package, model: torch.nn.Module) -> torch.nn.Module:
    """The model as the package's training loop runs it on a CPU (kernel classes swapped in, if any)."""
    try:
        kernels = importlib.import_module(f"{package.__name__}.fast.kernels")
    except ModuleNotFoundError:  # the kernels were still inside the model file
        return model
    return kernels.use_cpu_kernels(model)


def build_pair(packages: dict, shape: tuple, train: bool) -> dict[str, torch.nn.Module]:
    vocab, seq_len, embed, layers, heads, _ = shape
    models = {}
    for name, package in packages.items():
        torch.manual_seed(0)
        config = package.GPTConfig(vocab_size=vocab, seq_len=seq_len, embed_dim=embed, num_layers=layers,
                                   num_heads=heads, embd_dropout=0.1, attn_dropout=0.0, resid_dropout=0.1)
        model = package.GPT(config)
        models[name] = with_kernels(package, model).train() if train else model.eval()
    reference = next(iter(models.values())).state_dict()
    for model in models.values():
        model.load_state_dict(reference)  # the same weights (and names) in both trees
    return models


def train_steps(models: dict, ids: torch.Tensor, precision: str) -> dict:
    steps = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

        def step(model=model, opt=opt) -> None:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            with ctx:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--what", choices=["train", "sample", "all"], default="all")
    parser.add_argument("--rows", nargs="*", help=f"subset of {[*TRAIN_ROWS, *SAMPLE_ROWS]}")
    parser.add_argument("--precision", choices=["fp32", "bf16", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="report even when the machine is busy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_idle_or_exit(args.force)

    import codegpt

    with tempfile.TemporaryDirectory() as tmp:
        packages = {"tree": codegpt, "rev": import_revision(args.rev, Path(tmp))}
        print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds; "
              f"ratio = working tree time / {args.rev} time (median of per-round ratios)")
        print("| what | row | precision | tree (s) | rev (s) | ratio |")
        print("|---|---|---|---|---|---|")
        if args.what in ("train", "all"):
            precisions = ["fp32", "bf16"] if args.precision == "all" else [args.precision]
            for row, shape in TRAIN_ROWS.items():
                if args.rows and row not in args.rows:
                    continue
                vocab, seq_len, *_, batch = shape
                ids = torch.randint(0, vocab - 1, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
                ids[:, 0] = vocab - 1
                for precision in precisions:
                    steps = train_steps(build_pair(packages, shape, train=True), ids, precision)
                    med, ratio = interleaved_medians(steps, args.rounds, baseline="rev", warmup=1)
                    print(f"| train step | {row} | {precision} | {med['tree']:.3f} | {med['rev']:.3f} | "
                          f"{ratio['tree']:.3f} |", flush=True)
        if args.what in ("sample", "all"):
            for row, shape in SAMPLE_ROWS.items():
                if args.rows and row not in args.rows:
                    continue
                models = build_pair(packages, shape, train=False)
                start = torch.full((shape[-1], 1), shape[0] - 1, dtype=torch.long)
                calls = {name: (lambda p=packages[name], m=model, s=start: p.generate(m, s, top_k=100))
                         for name, model in models.items()}
                med, ratio = interleaved_medians(calls, args.rounds, baseline="rev", warmup=1)
                print(f"| sample image | {row} | fp32 | {med['tree']:.3f} | {med['rev']:.3f} | "
                      f"{ratio['tree']:.3f} |", flush=True)
    check_idle_or_exit(args.force, when="after")


if __name__ == "__main__":
    main()
