"""Bring your own codes: turn code grids you already have into a codegpt code dataset.

If your images are already tokenised (by a VQ-VAE, a VQGAN, or `codegpt.codebook.Codebook`), all
codegpt needs is an integer array of codes (N, H, W) in [0, codebook_size) and, for a
class-conditional prior, labels (N,) in [0, num_classes). This script writes such arrays as a code
dataset folder, reads it back (which validates every code and label) and prints one item in the
form the model trains on.

    python examples/bring_your_own_codes.py                 # writes to a temporary folder
    python examples/bring_your_own_codes.py --out my-codes  # keeps the dataset in my-codes/

Here the codes are random stand-ins; replace `codes` and `labels` with yours (numpy arrays or
torch tensors). For sets too large for memory, use `CodeDatasetWriter` and `add` batch by batch.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

from codegpt.data import CodeDataset, CodeDatasetWriter, write_code_dataset


def main(out: Path) -> None:
    codebook_size, num_classes, grid = 512, 3, (16, 16)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, codebook_size, size=(1000, *grid))  # your (N, H, W) codes
    labels = rng.integers(0, num_classes, size=1000)  # your (N,) class ids

    # Everything at once ...
    write_code_dataset(out / "codes", codes, labels, codebook_size=codebook_size,
                       num_classes=num_classes, class_names=["cats", "dogs", "birds"],
                       description="random stand-in codes", overwrite=True)

    # ... or batch by batch, when the codes come from a loop over a large image set.
    with CodeDatasetWriter(out / "streamed", codebook_size=codebook_size,
                           num_classes=num_classes, shard_size=256, overwrite=True) as writer:
        for begin in range(0, len(codes), 100):
            writer.add(codes[begin:begin + 100], labels[begin:begin + 100])

    dataset = CodeDataset(out / "codes")
    train, val = dataset.split(0.1, seed=0)
    print(dataset)
    print(f"train {len(train)} / validation {len(val)} items; model vocab_size="
          f"{dataset.vocab_size} (start token {dataset.start_token_id}), seq_len={dataset.seq_len}")
    item = dataset[0]
    print({name: tuple(tensor.shape) for name, tensor in item.items()})
    print("input_ids[:8]", item["input_ids"][:8].tolist())
    print("labels[:8]   ", item["labels"][:8].tolist())
    print("class        ", dataset.class_names[int(item["classes"])])
    shards = len(list((out / "streamed").glob("codes-*.safetensors")))
    print(f"streamed copy: {len(CodeDataset(out / 'streamed'))} items in {shards} shards")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the datasets (default: temporary)")
    args = parser.parse_args()
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        main(args.out)
