"""Train a prior on codes you already have (from a VQ-VAE, a VQGAN, or any tokenizer).

    python examples/train_bring_your_own_codes.py --codes codes.npy --labels labels.npy \\
        --codebook-size 1024 --out byo-run
    python examples/train_bring_your_own_codes.py --out byo-run     # a synthetic stand-in, no files needed
    accelerate launch --config_file examples/accelerate_cpu2.yaml examples/train_bring_your_own_codes.py ...

`codes.npy` holds integer codes (N, H, W) in [0, codebook_size); `labels.npy` (optional) the class of
each image (N,). They are read with numpy's `allow_pickle=False`. The script writes them as a code
dataset (safetensors shards plus dataset.json, validated on load), trains a prior on a held-out
split, prints bits per code against the independent-per-position baseline, and samples a grid
(each code drawn as a coloured cell: turning codes back into pixels is your decoder's job; pass
`decode=` to `train` to see pixels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from codegpt import GPT
from codegpt.data import CodeDataset, write_code_dataset
from codegpt.evaluation import evaluate_prior
from codegpt.runs import render_codes, save_image_grid
from codegpt.sampling import generate, to_grid
from codegpt.training import TrainingArguments, config_for, make_accelerator, train


def synthetic_codes(n: int = 2000, size: int = 8, codebook_size: int = 64, seed: int = 0):
    """Stand-in codes with learnable structure: class c draws stripes of orientation c (4 classes),
    each stripe one code, with a little noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    codes = np.empty((n, size, size), dtype=np.int64)
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for k in range(n):
        stripe = [ii, jj, ii + jj, ii - jj + size][labels[k]]
        palette = rng.integers(0, codebook_size, size=2 * size)
        codes[k] = palette[stripe % len(palette)]
        noise = rng.random((size, size)) < 0.05
        codes[k][noise] = rng.integers(0, codebook_size, int(noise.sum()))
    return codes, labels, codebook_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codes", help="codes (N, H, W) as .npy; default: synthetic stand-in codes")
    p.add_argument("--labels", help="classes (N,) as .npy (optional)")
    p.add_argument("--codebook-size", type=int, help="K; default: max code + 1")
    p.add_argument("--out", default="byo-run")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--resume", action="store_true")
    cli = p.parse_args()
    out = Path(cli.out)

    args = TrainingArguments(
        output_dir=out / "run", max_steps=cli.steps, per_device_batch_size=cli.batch_size, learning_rate=1e-3,
        warmup_steps=min(50, cli.steps), eval_every=100, save_every=100, sample_guidance_scale=2.0,
        resume=cli.resume, overwrite_output_dir=not cli.resume,
    )
    accelerator = make_accelerator(args)  # first: main_process_first() needs the process group

    with accelerator.main_process_first():
        if accelerator.is_main_process and not cli.resume:
            if cli.codes:
                codes = np.load(cli.codes, allow_pickle=False)
                labels = np.load(cli.labels, allow_pickle=False) if cli.labels else None
                codebook_size = cli.codebook_size or int(codes.max()) + 1
            else:
                codes, labels, codebook_size = synthetic_codes()
            write_code_dataset(
                out / "data", codes, labels, codebook_size=codebook_size,
                num_classes=0 if labels is None else int(labels.max()) + 1, overwrite=True,
                description=f"codes from {cli.codes or 'synthetic_codes()'}",
            )
    dataset = CodeDataset(out / "data")  # validates every code and label
    train_part, val_part = dataset.split(0.1, seed=0)

    # Vocabulary (codebook_size + the start token), sequence length and classes from the dataset.
    config = config_for(dataset, embed_dim=cli.embed_dim, num_layers=cli.layers, num_heads=cli.heads)
    result = train(args, config, train_part, val_part, grid_shape=dataset.grid, accelerator=accelerator)

    if accelerator.is_main_process:
        model = GPT.from_pretrained(result.model_dir).eval()
        metrics, _ = evaluate_prior(model, train_part, val_part, samples_per_class=8, held_out=result.final_eval)
        print(
            f"held-out {metrics['bits_per_code']:.3f} bits per code, independent baseline "
            f"{metrics['baseline_bits_per_code']:.3f} (ratio {metrics['bits_ratio']:.2f})"
        )
        # Sampling by hand: the same generate() the training loop and `codegpt sample` use.
        generator = torch.Generator().manual_seed(0)
        if config.class_conditional:
            classes = torch.arange(dataset.num_classes).repeat_interleave(6)
            tokens = generate(model, classes=classes, guidance_scale=2.0, generator=generator)
        else:
            tokens = generate(model, num_samples=6, generator=generator)
        grid = to_grid(tokens, dataset.grid)  # (B, H, W) codes: hand them to your decoder
        images = render_codes(grid.reshape(len(grid), -1), dataset.grid, None, dataset.codebook_size)
        png = save_image_grid(images, out / "samples_by_hand.png", rows=max(dataset.num_classes, 1))
        print(f"model: {result.model_dir}\nsamples: {result.samples_png}, {png}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
