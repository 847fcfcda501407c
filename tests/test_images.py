"""Image sources -> code datasets: every source gives the same datasets, processes do not matter,
bad input is refused by name and leaves nothing behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codegpt.autoencoders import DiffusersAutoencoder, PatchAutoencoder
from codegpt.codebook import Codebook
from codegpt.data import CodeDataset
from codegpt.images import (
    ArraySource,
    DatasetSource,
    FolderSource,
    ImageReadError,
    check_prior,
    convert_image,
    decode_codes,
    encode_images,
    load_encoding,
    load_source_indices,
    source_from_record,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "owl"]


def digit_like(n=36, size=8, seed=0):
    """uint8 images (n, size, size) and labels, in class order (the order of a class-folder layout)."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, len(CLASSES), n))
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    images[:, :, : size // 2] //= (labels[:, None, None] + 1).astype(np.uint8)  # classes differ a little
    return images, labels


def write_folder(root: Path, images, labels) -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def read_dataset(path: Path):
    dataset = CodeDataset(path)
    items = dataset.__getitems__(list(range(len(dataset))))
    codes = torch.stack([item["input_ids"] for item in items])
    labels = torch.stack([item["classes"] for item in items]) if "classes" in items[0] else None
    return codes, labels, dataset


def assert_same_encoding(a: Path, b: Path):
    for part in ("train", "val"):
        codes_a, labels_a, ds_a = read_dataset(a / part)
        codes_b, labels_b, ds_b = read_dataset(b / part)
        assert torch.equal(codes_a, codes_b), part
        assert torch.equal(labels_a, labels_b), part
        assert ds_a.class_names == ds_b.class_names
    assert torch.equal(Codebook.from_pretrained(a / "codebook").centroids,
                       Codebook.from_pretrained(b / "codebook").centroids)


ENCODE = dict(num_codes=12, val_fraction=0.25, seed=0, batch_size=8, progress=False)


def test_folder_datasets_and_arrays_give_identical_code_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    images, labels = digit_like()
    ae = PatchAutoencoder(8, channels=1, patch=2)
    arrays = encode_images(ArraySource(images, labels, class_names=CLASSES), ae, tmp_path / "arrays", **ENCODE)
    folder = write_folder(tmp_path / "pngs", images, labels)
    encode_images(FolderSource(folder), ae, tmp_path / "folder", **ENCODE)
    assert_same_encoding(tmp_path / "arrays", tmp_path / "folder")

    # datasets' imagefolder over the same files, and a data set saved with save_to_disk.
    local = DatasetSource("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "hf-cache"))
    assert local.class_names == CLASSES
    encode_images(local, ae, tmp_path / "imagefolder", **ENCODE)
    assert_same_encoding(tmp_path / "arrays", tmp_path / "imagefolder")
    saved = datasets.Dataset.from_dict(
        {"picture": [Image.fromarray(im) for im in images], "kind": labels.tolist()},
        features=datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=CLASSES)}))
    saved.save_to_disk(tmp_path / "saved")
    encode_images(DatasetSource(str(tmp_path / "saved"), image_column="picture", label_column="kind"), ae,
                  tmp_path / "disk", **ENCODE)
    assert_same_encoding(tmp_path / "arrays", tmp_path / "disk")
    # Each readable source opens again from its record (evaluation reads the real held-out images so).
    for name in ("folder", "imagefolder", "disk"):
        source = json.loads((tmp_path / name / "encoding.json").read_text())["source"]
        again = source_from_record(source)
        assert len(again) == len(images) and torch.equal(
            convert_image(again.load(5), (8, 8), 1), convert_image(Image.fromarray(images[5]), (8, 8), 1)), name
    with pytest.raises(ValueError, match="cannot be read again"):
        source_from_record(arrays.record["source"])

    record = arrays.record
    assert record["split"] == {"val_fraction": 0.25, "seed": 0, "num_train": 27, "num_val": 9}
    assert record["autoencoder"] == ae.spec() and record["skipped"] == []
    assert set(record["usage"]["val"]) >= {"perplexity", "dead_codes", "top_code_share", "latent_mse"}
    # The split is CodeDataset.split's: train and eval agree on it without being told.
    whole = encode_images(ArraySource(images, labels), ae, tmp_path / "whole", **{**ENCODE, "val_fraction": 0.0})
    assert whole.val is None
    _, val_part = CodeDataset(whole.train).split(0.25, seed=0)
    whole_codes, _, _ = read_dataset(whole.train)
    val_codes = read_dataset(tmp_path / "arrays" / "val")[0]
    assert torch.equal(Codebook.from_pretrained(tmp_path / "arrays" / "codebook").encode(
        ae.encode(torch.from_numpy(images[val_part.indices])[:, None].float() / 255)).flatten(1), val_codes[:, 1:])
    assert whole_codes.shape[0] == 36
    indices = load_source_indices(tmp_path / "arrays")
    assert indices["val"].tolist() == val_part.indices
    assert sorted(indices["train"].tolist() + indices["val"].tolist()) == list(range(36))


def test_codes_decode_back_through_the_recorded_autoencoder(tmp_path):
    images, labels = digit_like()
    ae = PatchAutoencoder(8, channels=1, patch=2)
    result = encode_images(ArraySource(images, labels), ae, tmp_path / "enc", **{**ENCODE, "num_codes": 30})
    record, codebook, loaded = load_encoding(tmp_path / "enc")  # the autoencoder comes from the record
    assert loaded.spec() == ae.spec()
    assert json.loads((tmp_path / "enc" / "codebook" / "config.json").read_text())["autoencoder"] == ae.spec()
    codes, _, dataset = read_dataset(result.train)
    pixels = decode_codes(codes[:, 1:], codebook, loaded)
    assert pixels.shape == (27, 1, 8, 8)
    original = torch.from_numpy(images).float()[:, None] / 255
    train_idx = torch.randperm(36, generator=torch.Generator().manual_seed(0))[9:].sort().values  # split's draw
    mse = float((pixels - original[train_idx]).pow(2).mean())
    assert mse == pytest.approx(record["usage"]["train"]["latent_mse"], rel=1e-4)  # patches: latents are pixels
    with pytest.raises(ValueError, match="another autoencoder.*patch: 2 recorded, 4 given"):
        load_encoding(tmp_path / "enc", autoencoder=PatchAutoencoder(8, 1, 4))
    # Each code dataset records what made its codes: the autoencoder, the codebook beside it, its split.
    for part, count in (("train", 27), ("val", 9)):
        dataset = CodeDataset(tmp_path / "enc" / part)
        assert dataset.autoencoder == ae.spec() and dataset.metadata["codebook"] == "../codebook"
        assert dataset.metadata["split"] == {"part": part, "val_fraction": 0.25, "seed": 0, "num_train": 27,
                                             "num_val": 9}
        assert dataset.metadata["source"]["type"] == "ArraySource" and len(dataset) == count


def test_mixed_sizes_and_modes_are_converted_or_refused_by_name(tmp_path):
    root = tmp_path / "mixed" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (16, 12), dtype=np.uint8)).save(root / "big.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)).save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).convert("P").save(root / "palette.png")
    ae = PatchAutoencoder(8, channels=1, patch=2)
    result = encode_images(FolderSource(tmp_path / "mixed"), ae, tmp_path / "ok",
                           **{**ENCODE, "num_codes": 4, "val_fraction": 0.0})
    assert result.record["num_images"] == 4
    with pytest.raises(ValueError, match=r"big.png: size 16x12 \(HxW\) is not the autoencoder's 8x8"):
        encode_images(FolderSource(tmp_path / "mixed"), ae, tmp_path / "refused",
                      **{**ENCODE, "num_codes": 4, "val_fraction": 0.0, "resize": "refuse"})
    assert not (tmp_path / "refused" / "encoding.json").exists()
    assert not (tmp_path / "refused" / "train").exists()


def test_center_crop_keeps_the_middle():
    wide = np.zeros((8, 16), dtype=np.uint8)
    wide[:, 4:12] = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = convert_image(wide, (8, 8), channels=1)
    assert torch.equal(out[0], torch.from_numpy(wide[:, 4:12]).float() / 255)
    assert convert_image(wide, (8, 8), channels=3, resize="stretch").shape == (3, 8, 8)
    with pytest.raises(ValueError, match="float images must already have shape"):
        convert_image(np.zeros((1, 4, 4), np.float32), (8, 8), channels=1)


def test_an_unreadable_file_is_refused_or_skipped_by_name(tmp_path):
    images, labels = digit_like(12)
    folder = write_folder(tmp_path / "pngs", images, labels)
    broken = sorted((folder / "dog").iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    ae = PatchAutoencoder(8, channels=1, patch=2)
    with pytest.raises(ImageReadError, match=f"{broken.name}: cannot read the image"):
        encode_images(FolderSource(folder), ae, tmp_path / "refused", **{**ENCODE, "num_codes": 4})
    assert not (tmp_path / "refused" / "encoding.json").exists()
    assert not (tmp_path / "refused" / "train").exists() and not (tmp_path / "refused" / "codebook").exists()
    result = encode_images(FolderSource(folder), ae, tmp_path / "skipped",
                           **{**ENCODE, "num_codes": 4, "on_error": "skip"})
    assert [Path(s["name"]).name for s in result.record["skipped"]] == [broken.name]
    assert result.record["num_images"] == 11


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    images, labels = digit_like(8)
    ae = PatchAutoencoder(8, channels=1, patch=2)
    with pytest.raises(ValueError, match="codebook dim 3 does not match the autoencoder's latent_dim 4"):
        encode_images(ArraySource(images, labels), ae, tmp_path / "out",
                      codebook=Codebook.from_centroids(torch.zeros(5, 3)), progress=False)
    assert not (tmp_path / "out").exists()
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"image": [Image.fromarray(im) for im in images]},
                                      features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(ValueError, match=r"label_column 'label' is not a column of the data set; its columns are "
                                         r"\['image'\]"):
        DatasetSource(data)
    with pytest.raises(ValueError, match="image_column 'img'"):
        DatasetSource(data, image_column="img", label_column=None)
    encode_images(ArraySource(images, labels), ae, tmp_path / "done", **{**ENCODE, "num_codes": 4})
    with pytest.raises(FileExistsError, match="already holds an encoding"):
        encode_images(ArraySource(images, labels), ae, tmp_path / "done", **{**ENCODE, "num_codes": 4})


def test_a_prior_or_codes_that_do_not_fit_the_autoencoder_are_refused():
    ae = PatchAutoencoder(8, channels=1, patch=2)  # a 4x4 grid of 4-dim latents
    codebook = Codebook.from_centroids(torch.rand(10, 4))

    class Config:
        seq_len, codebook_size = 16, 10

    check_prior(Config, codebook, ae)
    Config.seq_len = 64
    with pytest.raises(ValueError, match="seq_len 64 does not match the autoencoder's latent grid 4x4 = 16"):
        check_prior(Config, codebook, ae)
    with pytest.raises(ValueError, match=r"codes must have shape \(N, 4, 4\) or \(N, 16\)"):
        decode_codes(torch.zeros(2, 8, 8, dtype=torch.long), codebook, ae)
    with pytest.raises(ValueError, match="codebook dim 3 does not match the autoencoder's latent_dim 4"):
        decode_codes(torch.zeros(2, 16, dtype=torch.long), Codebook.from_centroids(torch.rand(10, 3)), ae)


TWO_PROCESS_SCRIPT = """
import sys
from codegpt.autoencoders import DiffusersAutoencoder
from codegpt.images import FolderSource, encode_images

folder, vae, out = sys.argv[1:4]
ae = DiffusersAutoencoder.from_pretrained(vae)
encode_images(FolderSource(folder), ae, out, num_codes=12, val_fraction=0.25, seed=0, batch_size=4,
              progress=False)
"""


def test_two_processes_under_accelerate_write_what_one_process_writes(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=8,
                            mid_block_add_attention=False).save_pretrained(tmp_path / "vae")
    images, labels = digit_like(22)  # 6 batches of 4, the last one short: the processes' shares differ
    folder = write_folder(tmp_path / "pngs", images, labels)
    script = tmp_path / "encode.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    # Two CPU processes over gloo wherever the tests run (on a one-GPU machine the config would ask for two GPUs).
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(REPO / "examples" / "accelerate_cpu2.yaml"), "--main_process_port", "0", str(script),
           str(folder), str(tmp_path / "vae"), str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    encode_images(FolderSource(folder), DiffusersAutoencoder.from_pretrained(tmp_path / "vae"), tmp_path / "one",
                  **{**ENCODE, "batch_size": 4})
    assert_same_encoding(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two" / ".encode-partial").exists()


@pytest.mark.parametrize("fit", [False, True], ids=["given-codebook", "fitted-codebook"])
def test_encoding_memory_does_not_grow_with_the_number_of_images(tmp_path, fit):
    # 32x32 RGB in 4x4 patches: 12 KiB of latents per image, so anything held per image shows.
    # tracemalloc sees numpy and Python objects, not torch's tensors; the benchmark measures those.
    import tracemalloc

    autoencoder = PatchAutoencoder(32, channels=3, patch=4)
    codebook = None if fit else Codebook.from_centroids(torch.rand(32, autoencoder.latent_dim,
                                                                   generator=torch.Generator().manual_seed(0)))
    rng = np.random.default_rng(0)

    def peak(n: int) -> int:
        source = ArraySource(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, n))
        tracemalloc.start()
        try:
            encode_images(source, autoencoder, tmp_path / f"n{n}", codebook=codebook, num_codes=32,
                          val_fraction=0.1, batch_size=32, kmeans={"max_epochs": 2}, progress=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(200), peak(800)
    # Before, the writer held 4,096 images' latents at a time (+14 MiB here from 200 to 800 images). What
    # may grow is a few numbers per image (labels, split, source indices): 600 x 40 bytes is 24 KB.
    assert large - small < 2**20, (small, large)
