"""The digits run as an `accelerate launch` script: one process, several CPU processes, or GPUs.

    python examples/digits_accelerate.py --out digits-run                      # one process
    accelerate launch --config_file examples/accelerate_cpu2.yaml \\
        examples/digits_accelerate.py --out digits-run                         # two CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 4 examples/digits_accelerate.py --out digits-run

The main process fits the codebook and writes the code dataset while the others wait; then every
process trains its share of each batch (the global batch is --batch-size x processes); the main
process finally samples every class, decodes them and judges them as `codegpt demo` does. Run it
again with --resume after an interruption: it continues from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codegpt.codebook import Codebook
from codegpt.data import CodeDataset
from codegpt.digits import codes_to_images, digits_code_dataset, load_digits_images, patch_decoder
from codegpt.evaluation import evaluate_prior, fit_digit_judge
from codegpt.runs import load_model
from codegpt.training import TrainingArguments, config_for, make_accelerator, train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="digits-run")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32,
                   help="per process (2 processes x 32 = the demo's global batch of 64)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None)
    p.add_argument("--resume", action="store_true")
    return p.parse_args()


def main() -> None:
    cli = parse_args()
    out = Path(cli.out)
    args = TrainingArguments(
        output_dir=out / "run",
        max_steps=cli.steps,
        per_device_batch_size=cli.batch_size,
        learning_rate=cli.lr,
        warmup_steps=50,
        weight_decay=0.3,
        mixed_precision=cli.mixed_precision,
        seed=cli.seed,
        eval_every=100,
        save_every=cli.save_every,
        sample_every=200,
        sample_guidance_scale=2.0,
        resume=cli.resume,
        overwrite_output_dir=not cli.resume,
    )
    # Made first: it sets up the process group that main_process_first() below waits on.
    accelerator = make_accelerator(args)
    with accelerator.main_process_first():
        # A resumed run keeps the codes it started with (a refit could differ in the last bits).
        fresh = not (cli.resume and (out / "data" / "dataset.json").is_file())
        if accelerator.is_main_process and fresh:
            digits_code_dataset(out, num_codes=128, patch=2, seed=cli.seed, val_fraction=0.2)
    dataset = CodeDataset(out / "data")
    codebook = Codebook.from_pretrained(out / "codebook")
    train_part, val_part = dataset.split(0.2, seed=cli.seed)

    config = config_for(dataset, dropout=0.25, embed_dim=128, num_layers=4, num_heads=4, class_dropout_prob=0.05,
                        tie_word_embeddings=True)  # the demo's prior
    result = train(
        args, config, train_part, val_part,
        decode=patch_decoder(codebook, patch=2),
        grid_shape=dataset.grid, accelerator=accelerator,
    )

    if accelerator.is_main_process:
        model = load_model(result.model_dir, device="cpu")
        images, labels = load_digits_images()
        judge = fit_digit_judge(images[train_part.indices], labels[train_part.indices], seed=cli.seed)
        metrics, _ = evaluate_prior(
            model, train_part, val_part, seed=cli.seed, judge=judge, held_out=result.final_eval,
            to_pixels=lambda codes: codes_to_images(codebook, codes, patch=2),
        )
        report = {"eval": metrics, "processes": accelerator.num_processes}
        (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(metrics, indent=2))
        print(f"samples: {result.samples_png}\nmodel: {result.model_dir}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
