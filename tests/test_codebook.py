"""Post-hoc codebook: k-means fitting, encode/decode, statistics, save/load, input validation."""

import json
import os

import numpy as np
import pytest
import torch

import codegpt.codebook as codebook_module
from codegpt.codebook import Codebook


def blobs(num_clusters=5, per_cluster=200, dim=8, spread=0.1, seed=0):
    """Well-separated Gaussian clusters: (points, true centres, true assignment)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=g) * 20
    assignment = torch.arange(num_clusters).repeat_interleave(per_cluster)
    points = centres[assignment] + spread * torch.randn(len(assignment), dim, generator=g)
    return points, centres, assignment


def assert_recovers(codebook, points, centres, assignment, atol=0.1):
    # every true centre has a centroid next to it, and the codes partition the points like the truth
    nearest = torch.cdist(centres, codebook.centroids).min(dim=1)
    assert nearest.values.max() < atol
    assert torch.equal(codebook.encode(points), nearest.indices[assignment])


def test_fit_recovers_separated_clusters():
    points, centres, assignment = blobs()
    codebook = Codebook.fit(points, 5, seed=0, progress=False)
    assert_recovers(codebook, points, centres, assignment)
    assert codebook.fit_info.converged
    assert codebook.stats(points).dead_codes == 0


@pytest.mark.parametrize("kind", ["list", "generator", "callable", "numpy"])
def test_fit_streams_batches(kind):
    points, centres, assignment = blobs(seed=1)
    shuffled = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(0))]
    batches = list(shuffled.split(128))
    data = {
        "list": batches,
        "generator": (b for b in batches),
        "callable": lambda: iter(batches),
        "numpy": shuffled.numpy(),
    }[kind]
    codebook = Codebook.fit(data, 5, seed=0, progress=False)
    assert_recovers(codebook, points, centres, assignment)
    if kind == "generator":
        assert codebook.fit_info.epochs == 1  # a one-shot stream is read once


def test_fit_is_reproducible_with_a_seed():
    points, _, _ = blobs(num_clusters=12, spread=3.0)
    a = Codebook.fit(points, 16, seed=7, batch_size=256, progress=False)
    b = Codebook.fit(points, 16, seed=7, batch_size=256, progress=False)
    c = Codebook.fit(points, 16, seed=8, batch_size=256, progress=False)
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)
    # without a seed one is drawn and recorded, so the fit can be repeated
    d = Codebook.fit(points, 16, batch_size=256, progress=False)
    e = Codebook.fit(points, 16, seed=d.seed, batch_size=256, progress=False)
    assert torch.equal(d.centroids, e.centroids)


def test_dead_codes_are_reseeded():
    points, centres, assignment = blobs(num_clusters=4)
    init = centres.clone()
    init[3] = 1000.0  # nothing will ever be nearest to this code
    codebook = Codebook.fit(points, 4, init=init, batch_size=100, reseed_after=2, seed=0,
                            progress=False)
    assert codebook.fit_info.reseeded >= 1
    assert codebook.stats(points).dead_codes == 0
    assert_recovers(codebook, points, centres, assignment)


def test_encode_decode_round_trip_any_leading_shape():
    g = torch.Generator().manual_seed(0)
    codebook = Codebook.from_centroids(torch.randn(10, 3, generator=g))
    codes = torch.randint(0, 10, (2, 3, 4), generator=g)
    vectors = codebook.decode(codes)
    assert vectors.shape == (2, 3, 4, 3)
    assert torch.equal(codebook.encode(vectors), codes)
    assert codebook.encode(vectors).dtype == torch.long
    # a nearby vector encodes to the same code; numpy input works too
    noisy = vectors + 1e-3 * torch.randn(vectors.shape, generator=g)
    assert torch.equal(codebook.encode(noisy.numpy()), codes)
    assert codebook(vectors[0, 0]).shape == (4,)


def test_encode_in_chunks_matches_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(0)
    codebook = Codebook.from_centroids(torch.randn(64, 4, generator=g))
    vectors = torch.randn(1000, 4, generator=g)
    whole = codebook.encode(vectors)
    monkeypatch.setattr(codebook_module, "_DISTANCE_BUDGET", 64 * 7)  # 7 rows per chunk
    assert torch.equal(codebook.encode(vectors), whole)
    assert codebook.stats(vectors).counts.sum() == 1000


def test_stats():
    codebook = Codebook.from_centroids(torch.eye(4))
    vectors = torch.eye(4)[[0, 1, 2, 0, 1, 2]]  # code 3 never used, the others equally
    stats = codebook.stats(vectors)
    assert stats.counts.tolist() == [2, 2, 2, 0]
    assert stats.dead_codes == 1
    assert stats.perplexity == pytest.approx(3.0)
    assert stats.mse == 0.0
    assert stats.num_vectors == 6
    shifted = codebook.stats(vectors + 0.5)  # every element off by 0.5
    assert shifted.mse == pytest.approx(0.25)


def test_cosine_metric_compares_directions():
    codebook = Codebook.from_centroids(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), metric="cosine")
    assert torch.allclose(codebook.centroids.norm(dim=1), torch.ones(2))
    assert codebook.encode(torch.tensor([[10.0, 1.0], [0.1, 0.5]])).tolist() == [0, 1]
    points, centres, _ = blobs(num_clusters=3, dim=4)
    fitted = Codebook.fit(points, 3, metric="cosine", seed=0, progress=False)
    assert torch.allclose(fitted.centroids.norm(dim=1), torch.ones(3), atol=1e-5)


def test_save_load_round_trip(tmp_path):
    points, _, _ = blobs()
    codebook = Codebook.fit(points, 5, seed=3, description="toy 8-d blobs", progress=False)
    codebook.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_codes"] == 5 and config["dim"] == 8
    assert config["metric"] == "euclidean" and config["seed"] == 3
    assert config["description"] == "toy 8-d blobs"

    loaded = Codebook.from_pretrained(tmp_path)
    assert torch.equal(loaded.centroids, codebook.centroids)
    assert (loaded.num_codes, loaded.dim, loaded.metric, loaded.seed, loaded.description) == (
        5, 8, "euclidean", 3, "toy 8-d blobs")
    # saving again over the folder replaces the files and leaves no temporary files behind
    Codebook.from_centroids(torch.zeros(2, 8)).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    assert Codebook.from_pretrained(tmp_path).num_codes == 2


def test_failed_save_keeps_the_previous_codebook(tmp_path, monkeypatch):
    old = Codebook.from_centroids(torch.ones(3, 2))
    old.save_pretrained(tmp_path)

    def crash(self, directory):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("killed")

    monkeypatch.setattr(Codebook, "_save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed"):
        Codebook.from_centroids(torch.zeros(5, 2)).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert torch.equal(Codebook.from_pretrained(tmp_path).centroids, old.centroids)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]


def test_load_is_safetensors_only_and_checks_files(tmp_path):
    Codebook.from_centroids(torch.ones(3, 2)).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"

    # a pickle next to the config is never a fallback
    weights.unlink()
    torch.save({"centroids": torch.ones(3, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Codebook.from_pretrained(tmp_path)

    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="model.safetensors"):
        Codebook.from_pretrained(tmp_path)

    from safetensors.torch import save_file
    save_file({"centroids": torch.ones(4, 2)}, str(weights))
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(3, 2\)"):
        Codebook.from_pretrained(tmp_path)

    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Codebook.from_pretrained(tmp_path)


def test_invalid_inputs_raise_clear_errors():
    codebook = Codebook.from_centroids(torch.zeros(8, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\).*\(10, 5\)"):
        codebook.encode(torch.zeros(10, 5))
    with pytest.raises(ValueError, match=r"codes\[1\] = 8 is outside \[0, 8\)"):
        codebook.decode(torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"-1 is outside \[0, 8\)"):
        codebook.decode(torch.tensor([[-1]]))
    with pytest.raises(TypeError, match="integers.*float32"):
        codebook.decode(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="list"):
        codebook.encode([[0.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="finite.*nan"):
        codebook.encode(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))

    points = torch.randn(20, 3)
    with pytest.raises(ValueError, match="num_codes must be >= 1, got 0"):
        Codebook.fit(points, 0, progress=False)
    with pytest.raises(ValueError, match=r"num_codes must be in \[1, 20\].*got 21"):
        Codebook.fit(points, 21, progress=False)
    with pytest.raises(TypeError, match="num_codes must be an int"):
        Codebook.fit(points, 2.5, progress=False)
    with pytest.raises(ValueError, match="metric must be one of"):
        Codebook.fit(points, 2, metric="manhattan", progress=False)
    with pytest.raises(ValueError, match=r"init must have shape .*\(2, 3\).*\(2, 4\)"):
        Codebook.fit(points, 2, init=torch.zeros(2, 4), progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Codebook.fit(points, 2, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="tol"):
        Codebook.fit(points, 2, tol=-1.0, progress=False)
    bad = points.clone()
    bad[4, 1] = float("inf")
    with pytest.raises(ValueError, match=r"data must be finite.*\(4, 1\)"):
        Codebook.fit(bad, 2, progress=False)
    with pytest.raises(ValueError, match="last dimension 3"):
        Codebook.fit([torch.randn(30, 3), torch.randn(30, 4)], 2, progress=False)
    with pytest.raises(TypeError, match="data must be"):
        Codebook.fit(42, 2, progress=False)
    with pytest.raises(ValueError, match=r"centroids must have shape \(num_codes, dim\)"):
        Codebook.from_centroids(torch.zeros(3))
    with pytest.raises(TypeError, match="real numbers"):
        Codebook.fit(np.zeros((4, 2), dtype=bool), 2, progress=False)


def test_load_from_a_subfolder_and_check_the_format(tmp_path, monkeypatch):
    codebook = Codebook.from_centroids(torch.arange(6.0).reshape(3, 2), description="shipped")
    codebook.save_pretrained(tmp_path / "codebook")  # as `codegpt push` ships it next to a prior
    loaded = Codebook.from_pretrained(tmp_path, subfolder="codebook")
    assert torch.equal(loaded.centroids, codebook.centroids) and loaded.description == "shipped"
    with pytest.raises(FileNotFoundError, match="config.json"):
        Codebook.from_pretrained(tmp_path, subfolder="elsewhere")

    # a repo id goes through the Hub cache with the subfolder and revision asked for
    calls = []

    def download(repo_id, filename, *, subfolder, revision, **kwargs):
        calls.append((repo_id, filename, subfolder, revision))
        return str(tmp_path / subfolder / filename)

    monkeypatch.setattr(codebook_module, "hf_hub_download", download)
    from_hub = Codebook.from_pretrained("user/prior", subfolder="codebook", revision="v1")
    assert torch.equal(from_hub.centroids, codebook.centroids)
    assert calls == [("user/prior", name, "codebook", "v1") for name in ("config.json", "model.safetensors")]

    config_file = tmp_path / "codebook" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        Codebook.from_pretrained(tmp_path / "codebook")
    config_file.write_text(json.dumps({**config, "format": "something.else"}))
    with pytest.raises(ValueError, match='expected "format": "codegpt.codebook"'):
        Codebook.from_pretrained(tmp_path / "codebook")
    config_file.write_text(json.dumps({**config, "num_codes": 0}))
    with pytest.raises(ValueError, match="config.json: num_codes must be >= 1, got 0"):
        Codebook.from_pretrained(tmp_path / "codebook")


def test_config_records_the_weights_and_a_load_checks_them(tmp_path):
    import hashlib

    Codebook.from_centroids(torch.rand(6, 3, generator=torch.Generator().manual_seed(0))).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    config = json.loads((tmp_path / "config.json").read_text())
    data = weights.read_bytes()
    assert config["files"] == {"model.safetensors": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}

    # A flipped mantissa bit: a well-formed file of finite centroids, other values. Only the digest sees it.
    flipped = bytearray(data)
    flipped[-1] ^= 1
    weights.write_bytes(bytes(flipped))
    Codebook.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model\.safetensors' does not match its SHA-256"):
        Codebook.from_pretrained(tmp_path, verify=True)

    # The same centroids in float64: well-formed, the shape config.json says, another size.
    from safetensors.torch import save_file
    save_file({"centroids": torch.rand(6, 3, dtype=torch.float64)}, str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors' holds \d+ bytes, \d+ were written"):
        Codebook.from_pretrained(tmp_path)

    # Saved before codegpt recorded the weights: loads as before.
    del config["files"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Codebook.from_pretrained(tmp_path, verify=True).num_codes == 6


def test_a_codebook_of_another_size_than_the_models_is_refused():
    codebook = Codebook.from_centroids(torch.zeros(8, 4))
    codebook.check_codebook_size(8)
    with pytest.raises(ValueError, match="num_codes 8 but the model's codebook_size is 16"):
        codebook.check_codebook_size(16)


@pytest.mark.parametrize("kind", ["tensor", "list"])
def test_the_progress_bar_counts_each_epoch_and_closes_at_convergence(kind, capsys):
    # Separated blobs converge long before max_epochs: the bar must show the epochs that ran and say where it
    # stopped, never a total of max_epochs epochs' batches.
    points, _, _ = blobs(spread=1.0)  # 1000 vectors
    data = points if kind == "tensor" else list(points.split(250))  # 4 batches an epoch either way
    codebook = Codebook.fit(data, 5, seed=0, batch_size=250, max_epochs=50, tol=1e-6, progress=True)
    info = codebook.fit_info
    assert info.converged and 1 < info.epochs < 50
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"k-means epoch {info.epochs} (of at most 50)" in last
    assert f"converged at epoch {info.epochs}" in last and "4/4" in last
    assert f"/{50 * 4}" not in err and f"epoch {info.epochs + 1} " not in err


def test_no_progress_writes_nothing(capsys):
    points, _, _ = blobs()
    Codebook.fit(points, 5, seed=0, progress=False)
    assert capsys.readouterr().err == ""
