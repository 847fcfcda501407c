"""Encoding benchmark: images in a folder -> autoencoder -> codes on disk, ``codegpt.images`` against a
plain loop over the same autoencoder, for 2,500, 5,000 and 10,000 32x32 RGB PNGs.

    python bench/bench_encode.py                 # the figures (a few minutes on 2 cores)
    python bench/bench_encode.py --quick --force # a check that it runs (seconds)

Both contenders read the same PNGs, encode them with the same autoencoder in batches of 64 and write
the codes of a fixed codebook as a code dataset:

- ``codegpt``: ``encode_images(FolderSource(...), autoencoder, out, codebook=...)``: images are read
  and converted batch by batch, latents go to a file on disk, codes to the dataset batch by batch;
- ``plain loop``: what a script does without it: read every image into a list, stack, encode in
  batches keeping every latent in memory, then quantise and ``write_code_dataset``.

Each (contender, number of images) runs in a fresh process, which reports its wall time and its peak
resident memory above the start (``_harness.peak_memory``). codegpt's peak must stay flat as the
number of images grows; the plain loop's grows with it. ``--autoencoder kl`` (default) is a small
diffusers AutoencoderKL built from a config (untrained: the speed is the same), 4x downsampling to
8x8x4 latents; ``--autoencoder patches`` measures the pipeline alone.

Refuses to report while other processes load the machine, unless --force (then says so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import check_idle_or_exit, peak_memory, run_fresh  # noqa: E402

SIZE = 32
BATCH = 64
NUM_CODES = 256


def make_autoencoder(kind: str):
    from codegpt.autoencoders import DiffusersAutoencoder, PatchAutoencoder

    if kind == "patches":
        return PatchAutoencoder(SIZE, channels=3, patch=4)
    import diffusers

    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=SIZE, mid_block_add_attention=False,
    )
    return DiffusersAutoencoder(model, batch_size=BATCH)


def make_codebook(autoencoder):
    from codegpt.codebook import Codebook

    centroids = torch.randn(NUM_CODES, autoencoder.latent_dim, generator=torch.Generator().manual_seed(0))
    return Codebook.from_centroids(centroids)


def write_pngs(folder: Path, n: int) -> None:
    """n random 32x32 RGB PNGs in 10 class folders (smooth blobs, so PNG compression is realistic)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        image.save(folder / f"class{i % 10}" / f"{i:06d}.png")


def run_codegpt(folder: Path, out: Path, autoencoder, codebook) -> None:
    from codegpt.images import FolderSource, encode_images

    encode_images(FolderSource(folder), autoencoder, out, codebook=codebook, val_fraction=0.0, batch_size=BATCH,
                  progress=False)


def run_plain(folder: Path, out: Path, autoencoder, codebook) -> None:
    from PIL import Image

    from codegpt.data import write_code_dataset

    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    files = [(f, label) for label, c in enumerate(classes) for f in sorted(c.iterdir())]
    images = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f, _ in files]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # every image in memory
    latents = autoencoder.encode(x, batch_size=BATCH)  # every latent in memory
    codes = codebook.encode(latents)
    labels = torch.tensor([label for _, label in files])
    write_code_dataset(out, codes, labels, codebook_size=codebook.num_codes, num_classes=len(classes))


def child(contender: str, folder: str, kind: str) -> None:
    torch.set_num_threads(torch.get_num_threads())
    autoencoder, codebook = make_autoencoder(kind), None
    codebook = make_codebook(autoencoder)
    run = run_codegpt if contender == "codegpt" else run_plain
    with tempfile.TemporaryDirectory() as tmp:
        seconds: list[float] = []

        def call() -> None:
            start = time.perf_counter()
            run(Path(folder), Path(tmp) / "out", autoencoder, codebook)
            seconds.append(time.perf_counter() - start)

        peak = peak_memory(call)
    print(json.dumps({"seconds": seconds[0], "peak_mb": None if peak is None else peak / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000])
    parser.add_argument("--autoencoder", choices=["kl", "patches"], default="kl")
    parser.add_argument("--rounds", type=int, default=1, help="fresh runs per figure (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="200 and 400 images: checks that it runs")
    parser.add_argument("--force", action="store_true", help="report even on a busy machine")
    parser.add_argument("--child", nargs=3, metavar=("CONTENDER", "FOLDER", "AUTOENCODER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sizes = [200, 400] if args.quick else sorted(args.sizes)
    check_idle_or_exit(args.force)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {max(sizes)} {SIZE}x{SIZE} PNGs ...", flush=True)
        write_pngs(Path(tmp) / "all", max(sizes))
        rows = []
        for n in sizes:
            folder = Path(tmp) / f"n{n}"
            for c in range(10):  # the first n images, as links into the full set
                (folder / f"class{c}").mkdir(parents=True)
            for c_dir in sorted((Path(tmp) / "all").iterdir()):
                for f in sorted(c_dir.iterdir()):
                    if int(f.stem) < n:
                        (folder / c_dir.name / f.name).symlink_to(f)
            for contender in ("codegpt", "plain loop"):
                runs = [run_fresh([__file__, "--child", contender.split()[0], str(folder), args.autoencoder])
                        for _ in range(args.rounds)]
                seconds = statistics.median(r["seconds"] for r in runs)
                peaks = [r["peak_mb"] for r in runs if r["peak_mb"] is not None]
                rows.append((n, contender, n / seconds, statistics.median(peaks) if peaks else float("nan")))
                print(f"{n:>6} images  {contender:<10}  {n / seconds:8.0f} images/s  peak {rows[-1][3]:8.1f} MiB",
                      flush=True)
    check_idle_or_exit(args.force, when="after")
    print(f"\n| images | contender | images/s | peak memory (MiB) |  ({args.autoencoder} autoencoder, batch {BATCH})")
    print("|---|---|---|---|")
    for n, contender, rate, peak in rows:
        print(f"| {n:,} | {contender} | {rate:.0f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
