"""Code datasets: write/read round trips, validation errors, splits, the digits pipeline, and the
alignment of dataset items with the model's labels convention."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from codegpt.codebook import Codebook
from codegpt.data import CodeDataset, CodeDatasetWriter, load_code_dataset, write_code_dataset
from codegpt.digits import (
    codes_to_images,
    digits_code_dataset,
    load_digits_images,
    patchify,
    unpatchify,
)


@pytest.fixture
def dataset_dir(tmp_path, random_codes):
    """A valid 40-item dataset in 4 shards of 10: (path, codes, labels)."""
    codes, labels = random_codes(codebook_size=128)
    path = write_code_dataset(tmp_path / "ds", codes, labels, codebook_size=128, num_classes=4,
                              shard_size=10)
    return path, codes, labels


def tamper(path, shard, **changes):
    """Rewrite one shard with some tensors replaced."""
    file = path / f"codes-{shard:05d}.safetensors"
    tensors = load_file(file)
    tensors.update(changes)
    save_file(tensors, str(file))


def test_round_trip_and_item_convention(tmp_path, random_codes):
    codes, labels = random_codes()
    names = ["cat", "dog", "fish", "bird"]
    path = write_code_dataset(tmp_path / "ds", codes, labels, codebook_size=300, num_classes=4,
                              class_names=names, description="random test codes")
    dataset = load_code_dataset(path)
    assert len(dataset) == 40
    assert dataset.grid == (3, 5) and dataset.seq_len == 15
    assert (dataset.codebook_size, dataset.start_token_id, dataset.vocab_size) == (300, 300, 301)
    assert dataset.num_classes == 4 and dataset.class_names == names
    assert dataset.description == "random test codes"
    assert torch.equal(dataset.labels, labels)
    meta = json.loads((path / "dataset.json").read_text())
    assert meta["codes_dtype"] == "int16" and meta["labels_dtype"] == "uint8"

    for i in (0, 17, 39, -1):
        item = dataset[i]
        assert set(item) == {"input_ids", "labels", "classes"}
        ids = item["input_ids"]
        assert ids.dtype == torch.long and ids.shape == (16,)
        assert ids[0] == 300  # the start token
        assert torch.equal(ids[1:], codes[i].flatten())  # row-major codes
        assert item["labels"][0] == -100
        assert torch.equal(item["labels"][1:], ids[1:])
        assert item["classes"].dtype == torch.long and item["classes"].shape == ()
        assert item["classes"] == labels[i]
    with pytest.raises(IndexError):
        dataset[40]


def test_writer_appends_several_shards(tmp_path, random_codes):
    codes, labels = random_codes(n=24, codebook_size=128)
    with CodeDatasetWriter(tmp_path / "ds", codebook_size=128, num_classes=4,
                           shard_size=7) as writer:
        for begin, end in [(0, 5), (5, 10), (10, 23), (23, 24)]:
            writer.add(codes[begin:end], labels[begin:end].numpy())  # tensors or arrays
    files = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert files == ["codes-00000.safetensors", "codes-00001.safetensors",
                     "codes-00002.safetensors", "codes-00003.safetensors", "dataset.json"]
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert [s["num_items"] for s in meta["shards"]] == [7, 7, 7, 3]
    assert meta["codes_dtype"] == "uint8"
    dataset = CodeDataset(tmp_path / "ds")
    stored = torch.stack([dataset[i]["input_ids"][1:] for i in range(24)])
    assert torch.equal(stored, codes.reshape(24, -1))
    assert torch.equal(torch.stack([dataset[i]["classes"] for i in range(24)]), labels)


def test_unconditional_dataset_has_no_classes(tmp_path, random_codes):
    codes, _ = random_codes(codebook_size=70000)  # needs int32 storage
    path = write_code_dataset(tmp_path / "ds", codes, codebook_size=70000)
    dataset = CodeDataset(path)
    assert "classes" not in dataset[3] and dataset.labels is None
    assert torch.equal(dataset[3]["input_ids"][1:], codes[3].flatten())
    assert json.loads((path / "dataset.json").read_text())["codes_dtype"] == "int32"


def test_batched_reads_and_dataloader_match_single_items(dataset_dir):
    path, codes, labels = dataset_dir
    dataset = CodeDataset(path)
    indices = [39, 0, 12, 12, 25]
    for batched, index in zip(dataset.__getitems__(indices), indices, strict=True):
        single = dataset[index]
        assert all(torch.equal(batched[k], single[k]) for k in single)
    batch = next(iter(DataLoader(dataset, batch_size=8, shuffle=False)))
    assert batch["input_ids"].shape == (8, 16) and batch["classes"].tolist() == labels[:8].tolist()
    # a pickled copy (what a spawned DataLoader worker gets) reads the same items
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[21]["input_ids"], dataset[21]["input_ids"])


def test_split_is_reproducible(dataset_dir):
    dataset = CodeDataset(dataset_dir[0])
    train, val = dataset.split(0.25, seed=3)
    train_again, val_again = dataset.split(0.25, seed=3)
    assert train.indices == train_again.indices and val.indices == val_again.indices
    assert len(val) == 10 and len(train) == 30
    assert sorted(train.indices + val.indices) == list(range(40))
    assert dataset.split(0.25, seed=4)[1].indices != val.indices
    assert torch.equal(val[0]["input_ids"], dataset[val.indices[0]]["input_ids"])
    for bad in (0.0, 1.0, 0.001, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            dataset.split(bad)


def test_bad_code_in_a_shard_names_row_and_value(dataset_dir):
    path, codes, _ = dataset_dir
    bad = codes[10:20].to(torch.uint8).clone()
    bad[7, 1, 2] = 130
    tamper(path, 1, codes=bad)
    with pytest.raises(ValueError, match=r"codes-00001\.safetensors row 7 \(item 17\): "
                                         r"code 130 at \(1, 2\) outside \[0, 128\)"):
        CodeDataset(path)


def test_bad_label_in_a_shard_names_row_and_value(dataset_dir):
    path, _, labels = dataset_dir
    bad = labels[30:40].to(torch.uint8).clone()
    bad[2] = 9
    tamper(path, 3, labels=bad)
    with pytest.raises(ValueError, match=r"codes-00003\.safetensors row 2 \(item 32\): "
                                         r"label 9 outside \[0, 4\)"):
        CodeDataset(path)


def test_wrong_grid_shape(dataset_dir):
    path, _, _ = dataset_dir
    meta = json.loads((path / "dataset.json").read_text())
    meta["grid"] = [5, 3]
    (path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"codes-00000\.safetensors.*\(10, 3, 5\).*\(5, 3\)"):
        CodeDataset(path)


def test_missing_truncated_and_foreign_shards(dataset_dir):
    path, _, _ = dataset_dir
    shard = path / "codes-00002.safetensors"
    original = shard.read_bytes()

    shard.write_bytes(original[:-7])
    with pytest.raises(ValueError, match=r"codes-00002\.safetensors is not a valid safetensors"):
        CodeDataset(path)

    shard.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(ValueError, match=r"codes-00002\.safetensors is not a valid safetensors"):
        CodeDataset(path)

    save_file({"something_else": torch.zeros(10, 3, 5)}, str(shard))
    with pytest.raises(ValueError, match=r"codes-00002\.safetensors has no tensor 'codes'"):
        CodeDataset(path)

    save_file({"codes": torch.zeros(10, 3, 5), "labels": torch.zeros(10, dtype=torch.long)},
              str(shard))
    with pytest.raises(ValueError, match=r"codes must be an integer tensor, got dtype F32"):
        CodeDataset(path)

    save_file({"codes": torch.zeros(9, 3, 5, dtype=torch.uint8),
               "labels": torch.zeros(9, dtype=torch.uint8)}, str(shard))
    with pytest.raises(ValueError, match=r"holds 9 items but dataset.json says 10"):
        CodeDataset(path)

    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"codes-00002\.safetensors"):
        CodeDataset(path)


def test_missing_or_malformed_metadata(dataset_dir, tmp_path):
    path, _, _ = dataset_dir
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CodeDataset(tmp_path / "nowhere")
    meta_file = path / "dataset.json"
    meta = json.loads(meta_file.read_text())

    meta_file.write_text("{ not json")
    with pytest.raises(ValueError, match="dataset.json is not valid JSON"):
        CodeDataset(path)
    meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        CodeDataset(path)
    meta_file.write_text(json.dumps({**meta, "codebook_size": 0}))
    with pytest.raises(ValueError, match="codebook_size must be >= 1, got 0"):
        CodeDataset(path)
    outside = [{"file": "../elsewhere.safetensors", "num_items": 40}]
    meta_file.write_text(json.dumps({**meta, "shards": outside, "num_items": 40}))
    with pytest.raises(ValueError, match="plain file name"):
        CodeDataset(path)
    meta_file.unlink()
    with pytest.raises(FileNotFoundError, match="dataset.json is missing"):
        CodeDataset(path)


def test_writer_rejects_bad_input(tmp_path, random_codes):
    codes, labels = random_codes(codebook_size=128)
    bad = codes.clone()
    bad[5, 2, 4] = 128
    with pytest.raises(ValueError, match=r"codes row 5 \(item 5\): code 128 at \(2, 4\) "
                                         r"outside \[0, 128\)"):
        write_code_dataset(tmp_path / "a", bad, labels, codebook_size=128, num_classes=4)
    with pytest.raises(ValueError, match=r"labels row 3 \(item 3\): label -1 outside \[0, 4\)"):
        write_code_dataset(tmp_path / "b", codes, torch.tensor([0, 1, 2, -1] * 10),
                           codebook_size=128, num_classes=4)
    with pytest.raises(TypeError, match="codes must hold integers, got dtype torch.float32"):
        write_code_dataset(tmp_path / "c", codes.float(), labels, codebook_size=128,
                           num_classes=4)
    with pytest.raises(ValueError, match=r"labels must have shape \(40,\)"):
        write_code_dataset(tmp_path / "d", codes, labels[:39], codebook_size=128, num_classes=4)
    with pytest.raises(ValueError, match="labels are required"):
        write_code_dataset(tmp_path / "e", codes, codebook_size=128, num_classes=4)
    with pytest.raises(ValueError, match="num_classes=0"):
        write_code_dataset(tmp_path / "f", codes, labels, codebook_size=128)
    with pytest.raises(ValueError, match=r"class_names must have num_classes=4 entries, got 2"):
        write_code_dataset(tmp_path / "g", codes, labels, codebook_size=128, num_classes=4,
                           class_names=["a", "b"])
    with CodeDatasetWriter(tmp_path / "h", codebook_size=128, num_classes=4) as writer:
        writer.add(codes[:3], labels[:3])
        with pytest.raises(ValueError, match=r"grid \(5, 3\), the dataset's grid is \(3, 5\)"):
            writer.add(codes[:3].reshape(3, 5, 3), labels[:3])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_code_dataset(tmp_path / "h", codes, labels, codebook_size=128, num_classes=4)


def test_interrupted_write_is_never_seen_as_complete(tmp_path, random_codes):
    codes, labels = random_codes(codebook_size=128)
    with pytest.raises(RuntimeError, match="interrupted"):
        with CodeDatasetWriter(tmp_path / "ds", codebook_size=128, num_classes=4,
                               shard_size=10) as writer:
            writer.add(codes, labels)  # four shards are on disk now
            raise RuntimeError("interrupted")
    assert list((tmp_path / "ds").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="dataset.json is missing"):
        CodeDataset(tmp_path / "ds")


def test_overwrite_replaces_and_drops_stale_shards(dataset_dir):
    path, codes, labels = dataset_dir  # 4 shards
    write_code_dataset(path, codes[:15], labels[:15], codebook_size=128, num_classes=4,
                       shard_size=10, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == [
        "codes-00000.safetensors", "codes-00001.safetensors", "dataset.json"]
    assert len(CodeDataset(path)) == 15


def test_items_line_up_with_the_models_labels_convention(dataset_dir):
    from codegpt import GPT, GPTConfig

    path, codes, labels = dataset_dir
    dataset = CodeDataset(path)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=dataset.vocab_size, seq_len=dataset.seq_len, embed_dim=32,
                       num_layers=1, num_heads=2, class_conditional=True,
                       num_classes=dataset.num_classes)
    model = GPT(config)
    model.eval()
    item = dataset[5]
    with torch.no_grad():
        out = model(item["input_ids"][None], labels=item["labels"][None],
                    classes=item["classes"][None])
    # position t predicts code t+1: the loss covers exactly the image's N codes, not the start
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), codes[5].flatten())
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_digits_pipeline(tmp_path):
    fitted = digits_code_dataset(tmp_path / "digits", seed=0, val_fraction=0)  # fitted on every digit
    codebook, path, metrics = fitted.codebook, fitted.dataset.path, fitted.metrics
    assert metrics["mse"] <= 1.0  # per pixel, on the 0-16 scale
    assert metrics["grid"] == (4, 4) and metrics["num_images"] == 1797
    assert fitted.val is None and len(fitted.train) == 1797
    assert torch.equal(Codebook.from_pretrained(tmp_path / "digits" / "codebook").centroids, codebook.centroids)
    dataset = CodeDataset(path)
    assert len(dataset) == 1797 and dataset.codebook_size == 128 and dataset.grid == (4, 4)
    assert sorted(set(dataset.labels.tolist())) == list(range(10))
    assert dataset.class_names == [str(d) for d in range(10)]

    images, labels = load_digits_images()
    assert torch.equal(dataset.labels, labels)
    codes = torch.stack([dataset[i]["input_ids"][1:] for i in range(20)]).reshape(20, 4, 4)
    decoded = codes_to_images(codebook, codes, patch=2)
    assert decoded.shape == (20, 8, 8)
    assert torch.mean((decoded - images[:20]) ** 2) < 1.5

    again = digits_code_dataset(tmp_path / "again", seed=0, val_fraction=0).codebook
    assert torch.equal(again.centroids, codebook.centroids)  # deterministic for a seed

    held = digits_code_dataset(tmp_path / "split", seed=0, val_fraction=0.2)
    assert held.metrics["mse_held_out"] <= 1.0
    # The codebook saw the training split only, and that split is the one CodeDataset.split gives.
    train_part, val_part = held.dataset.split(0.2, seed=0)
    assert held.train_indices == list(train_part.indices) and held.val_indices == list(val_part.indices)
    assert held.metrics["mse_fit"] == pytest.approx(
        held.codebook.stats(patchify(images[held.train_indices], 2)).mse
    )


def test_patchify_round_trip():
    images = torch.arange(2 * 8 * 8).reshape(2, 8, 8)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 4, 4)
    assert patches[0, 0, 1].tolist() == [2, 3, 10, 11]  # row-major within the patch
    assert torch.equal(unpatchify(patches, 2), images)
    assert torch.equal(unpatchify(patchify(np.ones((1, 8, 8)), 4), 4), torch.ones(1, 8, 8,
                       dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by patch=3"):
        patchify(images, 3)
    with pytest.raises(ValueError, match=r"\(N, h, w, 4\)"):
        unpatchify(patches[..., :3], 2)


def test_metadata_is_recorded_beside_the_format_and_read_back(tmp_path):
    codes = torch.randint(0, 8, (5, 2, 3), generator=torch.Generator().manual_seed(0))
    record = {"autoencoder": {"kind": "patches", "patch": 2}, "codebook": "../codebook",
              "split": {"val_fraction": 0.2, "seed": 3}}
    dataset = CodeDataset(write_code_dataset(tmp_path / "d", codes, codebook_size=8, metadata=record))
    assert dataset.metadata == record and dataset.autoencoder == record["autoencoder"]
    assert CodeDataset(write_code_dataset(tmp_path / "plain", codes, codebook_size=8)).autoencoder is None
    with pytest.raises(ValueError, match=r"metadata must not set the format's own keys \['grid'\]"):
        CodeDatasetWriter(tmp_path / "bad", codebook_size=8, metadata={"grid": [1, 1]})
    with pytest.raises(TypeError, match="metadata must be JSON-able"):
        CodeDatasetWriter(tmp_path / "bad", codebook_size=8, metadata={"when": object()})
    assert not (tmp_path / "bad" / "dataset.json").exists()


def test_fit_code_dataset_records_its_split_and_codebook(tmp_path):
    from codegpt.data import fit_code_dataset

    vectors = torch.randn(20, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    fitted = fit_code_dataset(tmp_path, vectors, torch.arange(20) % 2, num_codes=4, val_fraction=0.25, seed=5)
    meta = CodeDataset(tmp_path / "data").metadata
    assert meta["split"] == {"val_fraction": 0.25, "seed": 5}
    assert (tmp_path / "data" / meta["codebook"]).resolve() == (tmp_path / "codebook").resolve()
    # The split it records is the one it held out of the fit.
    assert CodeDataset(tmp_path / "data").split(0.25, seed=5)[1].indices == fitted.val_indices
    assert 0 < fitted.metrics["top_code_share"] <= 1


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_each_shard_records_its_size_and_sha256_and_every_load_checks_the_size(dataset_dir):
    import hashlib

    path, _, _ = dataset_dir
    meta = json.loads((path / "dataset.json").read_text())
    for shard in meta["shards"]:
        data = (path / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    # A well-formed shard with the same items, values and shape but another size (int16 codes instead of uint8).
    tensors = load_file(path / "codes-00001.safetensors")
    tamper(path, 1, codes=tensors["codes"].to(torch.int16))
    with pytest.raises(ValueError, match=r"codes-00001\.safetensors' holds \d+ bytes, \d+ were written"):
        CodeDataset(path)


def test_verify_catches_a_bit_flip_that_leaves_every_value_in_range(dataset_dir):
    path, codes, _ = dataset_dir
    shard = path / "codes-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 1  # a code byte (labels are the last 10 bytes): 0..127 stays in [0, 128)
    shard.write_bytes(bytes(data))
    assert not torch.equal(CodeDataset(path).__getitem__(29)["input_ids"][1:], codes[29].flatten())
    with pytest.raises(ValueError, match=r"codes-00002\.safetensors' does not match its SHA-256"):
        CodeDataset(path, verify=True)
    with pytest.raises(ValueError, match="SHA-256"):
        load_code_dataset(path, verify=True)


def test_a_shard_listed_twice_is_refused(dataset_dir):
    path, _, _ = dataset_dir
    meta = json.loads((path / "dataset.json").read_text())
    meta["shards"] = [meta["shards"][0], meta["shards"][1], meta["shards"][0], meta["shards"][3]]
    (path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"codes-00000\.safetensors' is listed twice"):
        CodeDataset(path)


def test_a_dataset_without_records_still_loads_and_says_it_cannot_be_checked(dataset_dir):
    path, codes, _ = dataset_dir
    meta = json.loads((path / "dataset.json").read_text())
    for shard in meta["shards"]:  # as codegpt wrote them before it recorded sizes
        del shard["bytes"], shard["sha256"]
    (path / "dataset.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="records no shard sizes or SHA-256"):
        dataset = CodeDataset(path, verify=True)
    assert not dataset.has_records and len(dataset) == 40
    assert torch.equal(dataset[7]["input_ids"][1:], codes[7].flatten())
    # Half with and half without records is a hand edit, not an old dataset.
    meta["shards"][2]["bytes"] = 1
    (path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="size record"):
        CodeDataset(path)


def test_an_overwrite_that_fails_partway_leaves_the_old_dataset_intact(dataset_dir, random_codes):
    path, codes, labels = dataset_dir
    before = _snapshot(path)
    new_codes, new_labels = random_codes(codebook_size=128, seed=1)
    with pytest.raises(RuntimeError, match="disk on fire"):
        with CodeDatasetWriter(path, codebook_size=128, num_classes=4, shard_size=10, overwrite=True) as writer:
            writer.add(new_codes, new_labels)  # four new shards are written by now
            raise RuntimeError("disk on fire")
    assert _snapshot(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ds"]  # no work folder left behind
    assert torch.equal(CodeDataset(path, verify=True).labels, labels)
    # Completed, it replaces the old one in one swap.
    write_code_dataset(path, new_codes[:15], new_labels[:15], codebook_size=128, num_classes=4, overwrite=True)
    assert torch.equal(CodeDataset(path, verify=True).labels, new_labels[:15])
    assert sorted(p.name for p in path.parent.iterdir()) == ["ds"]


def test_the_writer_never_replaces_a_folder_holding_other_files(tmp_path, random_codes):
    codes, labels = random_codes(codebook_size=128)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        write_code_dataset(tmp_path / "mine", codes, labels, codebook_size=128, num_classes=4, overwrite=True)
    assert _snapshot(tmp_path / "mine") == {"notes.txt": b"precious"}


def test_a_killed_writers_work_folder_is_removed_by_the_next_writer(tmp_path, random_codes):
    import subprocess
    import sys

    codes, labels = random_codes(codebook_size=128)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ds.tmp-{int(dead.stdout)}-0badc0de"  # what a kill -9 mid-write leaves
    stale.mkdir()
    (stale / "codes-00000.safetensors").write_bytes(b"half")
    live = tmp_path / f".ds.tmp-{os.getppid()}-0badc0de"  # a writer still running
    live.mkdir()
    write_code_dataset(tmp_path / "ds", codes, labels, codebook_size=128, num_classes=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", live.name])


def test_the_leftovers_of_an_older_killed_write_do_not_block_a_new_one(tmp_path, random_codes):
    codes, labels = random_codes(codebook_size=128)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "codes-00000.safetensors").write_bytes(b"half")
    (tmp_path / "ds" / ".dataset.json.1234-abcd.tmp").write_bytes(b"{")
    write_code_dataset(tmp_path / "ds", codes, labels, codebook_size=128, num_classes=4)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["codes-00000.safetensors", "dataset.json"]
    assert len(CodeDataset(tmp_path / "ds", verify=True)) == 40
