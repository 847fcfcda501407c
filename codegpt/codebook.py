"""Post-hoc codebooks: a D-dimensional vector (an autoencoder's latent, a flattened pixel patch) maps to
the index of its nearest centroid, and an index back to that centroid; the prior only sees indices.
`Codebook.fit` runs mini-batch k-means, so data larger than memory can stream through;
`Codebook.from_centroids` wraps the codebook of a trained VQ-VAE/VQGAN. Saved folders hold
`model.safetensors` (the centroids) and `config.json` (written last; it records the weights' size and
SHA-256 under "files"); loading reads safetensors only, never a pickle, checks the size, and with
`verify=True` the SHA-256 too::

    codebook = Codebook.fit(latents, num_codes=512, seed=0)   # latents: (..., D)
    codes = codebook.encode(latents)                          # (...)
    codebook.save_pretrained("my-codebook")
    codebook = Codebook.from_pretrained("my-codebook")
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, count
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ._util import (
    as_tensor,
    check_choice,
    check_file_records,
    check_float,
    check_format,
    check_int,
    file_record,
    read_json,
    replace_dir,
    save_safetensors,
    write_json,
    write_text,
)

__all__ = ["Codebook", "CodebookStats", "FitInfo"]

METRICS = ("euclidean", "cosine")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "codegpt.codebook"
FORMAT_VERSION = 1

# Distance matrices are built chunk by chunk so that encoding any number of vectors needs at most
# this many float elements (64 MiB in fp32) of scratch memory.
_DISTANCE_BUDGET = 1 << 24

# Counts carry over from one epoch to the next scaled by this factor. At 1 (classic mini-batch
# k-means) the step size 1/count keeps shrinking, so centroids freeze early and keep the mistakes of
# the first epochs; at 0 each epoch's first batch alone sets a centroid, which is noisy. 0.2 reached
# Lloyd-quality inertia on the digits patches at every batch size tried (1k to 32k).
_COUNT_DECAY = 0.2

Batches = torch.Tensor | np.ndarray | Iterable[Any] | Callable[[], Iterable[Any]]


@dataclass
class FitInfo:
    """How a `Codebook.fit` run went."""

    epochs: int
    steps: int
    converged: bool
    reseeded: int  # dead codes moved onto badly served data points, over the whole run
    seconds: float
    mse: list[float] = field(default_factory=list)  # per epoch, at assignment time


@dataclass
class CodebookStats:
    """Usage and quality of a codebook over some vectors (see `Codebook.stats`)."""

    counts: torch.Tensor  # (num_codes,) how many vectors each code serves
    perplexity: float  # exp(entropy of the usage); num_codes when every code is used equally
    dead_codes: int  # codes that serve no vector
    mse: float  # mean squared error per element between the vectors and their decoded codes
    num_vectors: int


class Codebook(torch.nn.Module, PyTorchModelHubMixin, library_name="codegpt",
               tags=["codegpt", "codebook", "vector-quantization", "k-means"]):
    """`num_codes` centroids of dimension `dim`; code i is the index of centroid i.

    Args:
        num_codes: number of codes K (codes are 0..K-1; a prior over them needs K+1 tokens).
        dim: dimension D of the vectors.
        metric: "euclidean" (nearest centroid) or "cosine" (vectors and centroids are
            L2-normalised first, so `decode` returns unit vectors).
        seed: the seed the centroids were fitted with, kept for the record.
        description: free text saying what the vectors are (which autoencoder, which layer,
            which patch size), so a saved codebook says what it can decode.
    """

    centroids: torch.Tensor

    def __init__(self, num_codes: int, dim: int, metric: str = "euclidean", seed: int | None = None,
                 description: str = "") -> None:
        super().__init__()
        check_int("num_codes", num_codes, low=1)
        check_int("dim", dim, low=1)
        check_choice("metric", metric, METRICS)
        if seed is not None:
            check_int("seed", seed, low=0)
        _check_description(description)
        self.num_codes, self.dim, self.metric, self.seed, self.description = num_codes, dim, metric, seed, description
        self.fit_info: FitInfo | None = None
        self.register_buffer("centroids", torch.zeros(num_codes, dim))

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, metric={self.metric!r}"

    @classmethod
    def from_centroids(cls, centroids: torch.Tensor, metric: str = "euclidean", description: str = "") -> Codebook:
        """Wrap existing centroids (K, D), e.g. the embedding table of a trained VQ-VAE."""
        centroids = _check_centroids("centroids", centroids)
        codebook = cls(centroids.shape[0], centroids.shape[1], metric=metric, description=description)
        codebook.centroids = _normalise(centroids, metric).clone()
        return codebook

    @classmethod
    def fit(cls, data: Batches, num_codes: int, *, metric: str = "euclidean", batch_size: int = 4096,
            max_epochs: int = 100, tol: float = 1e-4, init: torch.Tensor | None = None, init_size: int | None = None,
            reseed_after: int = 10, seed: int | None = None, device: torch.device | str | None = None,
            description: str = "", progress: bool = True) -> Codebook:
        """Fit `num_codes` centroids to `data` with mini-batch k-means; `fit_info` (a `FitInfo`) says how it went.

        Args:
            data: the vectors. Either one tensor/array of shape (..., D), shuffled into batches of
                `batch_size` each epoch; or batches of shape (..., D) for data that does not fit in
                memory: a callable returning a fresh iterable of batches (one call per epoch), a
                re-iterable (list, DataLoader), or a one-shot iterator (then only one epoch runs).
                Streams should be shuffled: k-means++ seeds from the first `init_size` vectors.
            num_codes: K, at least 1 and at most the number of vectors.
            batch_size: vectors per update when `data` is a tensor.
            max_epochs: passes over the data at most.
            tol: stop once an epoch moves the centroids by at most `tol` (mean squared shift,
                relative to the data's variance) and re-seeds no dead code.
            init: (K, D) starting centroids instead of k-means++.
            init_size: how many vectors k-means++ seeds from (default max(20 K, 10 000)).
            reseed_after: a code that wins no vector for this many consecutive batches is dead and
                moves onto a vector its nearest centroid serves badly (drawn with probability
                proportional to the squared error).
            seed: seeds every random choice (k-means++, shuffling, re-seeding); None draws one
                from torch's global generator. It is stored in the codebook either way.
            device: where to compute; default the device of `data` (or of its first batch).
            progress: show a tqdm progress bar over each epoch's batches; it says the epoch, and the one
                it converged at.
        """
        check_int("num_codes", num_codes, low=1)
        check_int("batch_size", batch_size, low=1)
        check_int("max_epochs", max_epochs, low=1)
        check_int("reseed_after", reseed_after, low=1)
        check_choice("metric", metric, METRICS)
        check_float("tol", tol, low=0.0)
        _check_description(description)
        init_size = max(20 * num_codes, 10_000) if init_size is None else init_size
        check_int("init_size", init_size, low=num_codes)
        seed = check_int("seed", int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed, low=0)

        start = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        source = _BatchSource(data, batch_size, generator, device)
        sample = _normalise(source.sample(init_size), metric)  # all of a tensor when it holds <= init_size
        dim = sample.shape[1]
        # Initial centroids make up for a short stream, never for a tensor with fewer vectors than codes.
        if sample.shape[0] < num_codes and (init is None or source.tensor is not None):
            raise ValueError(f"num_codes must be in [1, {sample.shape[0]}] (the number of vectors), got {num_codes}")
        if init is not None:
            centroids = _normalise(_check_centroids("init", init, (num_codes, dim)).to(sample), metric).clone()
        else:
            centroids = _kmeans_plus_plus(sample, num_codes, generator)
        # Relative tolerance: a shift means nothing without the scale of the data.
        scale = float(sample.var(dim=0, unbiased=False).sum()) or 1.0
        del sample

        counts = torch.zeros(num_codes, dtype=centroids.dtype, device=centroids.device)
        idle = torch.zeros(num_codes, dtype=torch.long, device=centroids.device)
        info = FitInfo(epochs=0, steps=0, converged=False, reseeded=0, seconds=0.0)
        # The bar counts the batches of the epoch under way (what is really left of it), epoch after epoch: how
        # many epochs run is known only when the centroids stop moving, so no bar promises max_epochs of them.
        per_epoch = source.batches_per_epoch
        with tqdm(total=per_epoch, unit="batch", disable=not progress) as bar:
            for epoch in range(max_epochs):
                if epoch:
                    bar.reset(total=per_epoch)
                bar.set_description(f"k-means epoch {epoch + 1} (of at most {max_epochs})")
                previous = centroids.clone()
                counts *= _COUNT_DECAY
                sq_error, seen, reseeded = 0.0, 0, 0
                for x in source.epoch():
                    x = _normalise(x, metric)
                    codes, dist = _assign(x, centroids)
                    reseeded += _update(x, codes, dist, centroids, counts, idle, reseed_after,
                                        generator, metric)
                    sq_error += float(dist.sum())
                    seen += x.shape[0]
                    info.steps += 1
                    bar.update(1)
                if seen == 0:
                    raise ValueError("data yielded no vectors in an epoch")
                per_epoch = per_epoch or bar.n  # a stream's length is known after one pass
                info.epochs = epoch + 1
                info.reseeded += reseeded
                info.mse.append(sq_error / (seen * dim))
                shift = float((centroids - previous).pow(2).sum(dim=1).mean()) / scale
                info.converged = shift <= tol and reseeded == 0
                bar.set_postfix_str(f"mse={info.mse[-1]:.4g}, shift={shift:.2e}"
                                    + (f", converged at epoch {info.epochs}" if info.converged else ""))
                if info.converged or not source.repeatable:
                    break
        info.seconds = time.perf_counter() - start

        codebook = cls(num_codes, dim, metric=metric, seed=seed, description=description)
        codebook.centroids = centroids
        codebook.fit_info = info
        return codebook

    @torch.no_grad()
    def encode(self, vectors: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Nearest-centroid codes: (..., D) -> (...) int64, on the input's device."""
        vectors = self._check_vectors(vectors)
        flat = _normalise(vectors.reshape(-1, self.dim).to(self.centroids), self.metric)
        codes = torch.cat([_assign(x, self.centroids)[0] for x in flat.split(self._chunk_rows())])
        return codes.reshape(vectors.shape[:-1]).to(vectors.device)

    forward = encode

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Centroids of `codes`: (...) integers in [0, num_codes) -> (..., D)."""
        codes = as_tensor("codes", codes, integer=True)
        bad = (codes < 0) | (codes >= self.num_codes)
        if bool(bad.any()):
            position = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"codes{list(position)} = {int(codes[position])} is outside [0, {self.num_codes})")
        return self.centroids[codes.to(self.centroids.device, torch.long)].to(codes.device)

    @torch.no_grad()
    def stats(self, vectors: torch.Tensor | np.ndarray) -> CodebookStats:
        """Code usage, perplexity, dead codes and reconstruction MSE over `vectors` (..., D).

        With the cosine metric the error is measured against the L2-normalised vectors.
        """
        vectors = self._check_vectors(vectors)
        flat = vectors.reshape(-1, self.dim)
        if flat.shape[0] == 0:
            raise ValueError(f"vectors must hold at least one vector, got shape {tuple(vectors.shape)}")
        counts = torch.zeros(self.num_codes, dtype=torch.long, device=self.centroids.device)
        sq_error = 0.0
        for chunk in flat.split(self._chunk_rows()):
            x = _normalise(chunk.to(self.centroids), self.metric)
            codes, dist = _assign(x, self.centroids)
            counts += torch.bincount(codes, minlength=self.num_codes)
            # Exact error from the decoded vectors; the expanded-square distance may cancel.
            sq_error += float((x - self.centroids[codes]).pow(2).sum())
        entropy = float(torch.special.entr(counts.double() / flat.shape[0]).sum())
        return CodebookStats(counts=counts.cpu(), perplexity=math.exp(entropy), dead_codes=int((counts == 0).sum()),
                             mse=sq_error / flat.numel(), num_vectors=flat.shape[0])

    def _chunk_rows(self) -> int:
        return max(1, _DISTANCE_BUDGET // self.num_codes)

    def _check_vectors(self, vectors: Any) -> torch.Tensor:
        vectors = as_tensor("vectors", vectors)
        if vectors.ndim == 0 or vectors.shape[-1] != self.dim:
            raise ValueError(f"vectors must have shape (..., {self.dim}) (the codebook's dim), "
                             f"got {tuple(vectors.shape)}")
        _check_finite("vectors", vectors)
        return vectors

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None,  # type: ignore[override]
                        repo_id: str | None = None, push_to_hub: bool = False,
                        model_card_kwargs: dict[str, Any] | None = None, **push_to_hub_kwargs: Any) -> str | None:
        """Save `model.safetensors`, `config.json` and (if absent) a README model card.

        Each file is written atomically (a temporary file renamed into place), config last with the
        weights' size and SHA-256 ("files"), so a kill mid-save leaves the old files or the new ones,
        never a half-written file, and a later load notices a weights file that changed. `config`
        entries are added to the metadata (they cannot override it). `push_to_hub=True` then uploads
        the folder (see `push_to_hub`).
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        full_config = {
            **(config or {}), "format": FORMAT, "format_version": FORMAT_VERSION, "num_codes": self.num_codes,
            "dim": self.dim, "metric": self.metric, "seed": self.seed, "description": self.description,
        }
        if (info := self.fit_info) is not None:
            full_config["fit"] = {"epochs": info.epochs, "converged": info.converged, "mse": (info.mse or [None])[-1]}
        # The weights go to a scratch folder first: `_save_pretrained` is the mixin's hook and
        # may be any writer; only a finished file is moved over the old one.
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".tmp-codebook-") as tmp:
            self._save_pretrained(Path(tmp))
            replace_dir(Path(tmp) / WEIGHTS_NAME, save_directory / WEIGHTS_NAME)
        full_config["files"] = {WEIGHTS_NAME: file_record(save_directory / WEIGHTS_NAME)}
        readme = save_directory / "README.md"
        if not readme.exists():  # a card written by hand is kept
            write_text(readme, str(self.generate_model_card(**(model_card_kwargs or {}))))
        write_json(save_directory / CONFIG_NAME, full_config)
        if not push_to_hub:
            return None
        return self.push_to_hub(repo_id or save_directory.name, config=full_config,
                                model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        centroids = {"centroids": self.centroids.detach().contiguous().cpu()}
        save_safetensors(Path(save_directory) / WEIGHTS_NAME, centroids, metadata={"format": FORMAT})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *,  # type: ignore[override]
                        subfolder: str | None = None, revision: str | None = None,
                        cache_dir: str | os.PathLike[str] | None = None, force_download: bool = False,
                        local_files_only: bool = False, token: str | bool | None = None,
                        map_location: str | torch.device = "cpu", verify: bool = False) -> Codebook:
        """Load a saved codebook from a folder or a Hub repo id: safetensors only, never a pickle.

        `subfolder` is the codebook's folder inside the repo or folder (`codegpt push` ships a
        prior's codebook in "codebook"); `revision` pins a Hub branch, tag or commit. The weights'
        size is checked against the record in config.json (codebooks saved before codegpt recorded
        it have none), and their SHA-256 too when `verify`.
        """
        source = str(pretrained_model_name_or_path)
        where = os.path.join(source, subfolder or "")

        def fetch(filename: str) -> str:
            if os.path.isdir(source):
                if not os.path.isfile(os.path.join(where, filename)):
                    raise FileNotFoundError(f"{where}: no {filename}; not a saved Codebook")
                return os.path.join(where, filename)
            return hf_hub_download(source, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                                   force_download=force_download, local_files_only=local_files_only, token=token)

        config_file = fetch(CONFIG_NAME)
        config = read_json(config_file, "pretrained_model_name_or_path")
        check_format(config_file, config, FORMAT, FORMAT_VERSION)
        weights = fetch(WEIGHTS_NAME)
        try:
            codebook = cls(config.get("num_codes"), config.get("dim"),  # type: ignore[arg-type]
                           **{key: config[key] for key in ("metric", "seed", "description") if key in config})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_file}: {err}") from None
        try:
            tensors = load_file(weights, device=str(map_location))
        except SafetensorError as err:
            raise ValueError(f"{weights} is not a readable safetensors file: {err}") from None
        centroids, shape = tensors.get("centroids"), (codebook.num_codes, codebook.dim)
        if set(tensors) != {"centroids"} or centroids.shape != shape or not centroids.is_floating_point():
            found = {name: f"{tuple(t.shape)} {t.dtype}" for name, t in tensors.items()}
            raise ValueError(f"{weights} holds {found}, not one floating-point tensor 'centroids' of shape "
                             f"(num_codes, dim) = {shape} as {CONFIG_NAME} says")
        _check_finite(f"{weights}: centroids", centroids)
        if (files := config.get("files")) is not None:
            if not isinstance(files, dict) or set(files) != {WEIGHTS_NAME}:
                raise ValueError(f"{config_file}: files must record {WEIGHTS_NAME} alone, got {files!r}")
            check_file_records(Path(weights).parent, files, config_file, hashes=verify)
        codebook.centroids = centroids
        return codebook.eval()

    def check_codebook_size(self, codebook_size: int) -> None:
        """Refuse to decode a prior's codes (in [0, codebook_size)) with a codebook of another size."""
        if codebook_size != self.num_codes:
            raise ValueError(f"the codebook has num_codes {self.num_codes} but the model's codebook_size is "
                             f"{codebook_size}: use the codebook the model's codes were made with")


class _BatchSource:
    """Turns a tensor, an iterable or a callable into epochs of (n, D) float batches."""

    def __init__(self, data: Batches, batch_size: int, generator: torch.Generator,
                 device: torch.device | str | None) -> None:
        self.generator, self.batch_size = generator, batch_size
        self.device = None if device is None else torch.device(device)
        self.tensor: torch.Tensor | None = None
        self.batches_per_epoch: int | None = None
        self.pending: list[torch.Tensor] = []  # batches read for k-means++ from a one-shot stream
        self.dim: int | None = None
        self._batch_index = count()
        # iter() restarts a list or a DataLoader, but continues a generator where it was: that is read once.
        self.repeatable = not isinstance(data, Iterator)
        if isinstance(data, (torch.Tensor, np.ndarray)):
            tensor = as_tensor("data", data)
            if tensor.ndim < 1 or tensor.shape[-1] < 1 or tensor.numel() == 0:
                raise ValueError(f"data must have shape (..., D) with D >= 1 and hold at least one "
                                 f"vector, got {tuple(tensor.shape)}")
            tensor = tensor.reshape(-1, tensor.shape[-1])
            _check_finite("data", tensor)
            self.tensor = tensor.to(self.device) if self.device is not None else tensor
            self.batches_per_epoch = -(-tensor.shape[0] // batch_size)
        elif isinstance(data, Iterable) or callable(data):
            self.new_iterable: Callable[[], Iterable[Any]] = (lambda: data) if isinstance(data, Iterable) else data
        else:
            raise TypeError("data must be a tensor/array of shape (..., D), an iterable of such batches, or a "
                            f"callable returning one, got {type(data).__name__}")

    def _prepare(self, batch: Any) -> torch.Tensor:
        index = next(self._batch_index)
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            batch = batch[0]  # (vectors, labels) pairs from a DataLoader
        x = as_tensor(f"data batch {index}", batch)
        if x.ndim < 1:
            raise ValueError(f"data batch {index} must have shape (..., D), got a scalar")
        x = x.reshape(-1, x.shape[-1])
        if self.dim is None:
            self.dim = x.shape[1]
        elif x.shape[1] != self.dim:
            raise ValueError(f"data batch {index} must have last dimension {self.dim} (that of "
                             f"the first batch), got shape {tuple(batch.shape)}")
        _check_finite(f"data batch {index}", x)
        if self.device is None:
            self.device = x.device
        return x.to(self.device)

    def sample(self, size: int) -> torch.Tensor:
        """Up to `size` vectors for k-means++: a random subset, or the head of a stream."""
        if self.tensor is not None:
            n = self.tensor.shape[0]
            if n <= size:
                return self.tensor
            index = torch.randperm(n, generator=self.generator)[:size]
            return self.tensor[index.to(self.tensor.device)]
        taken, total = [], 0
        for x in map(self._prepare, self.new_iterable()):
            taken.append(x)
            total += x.shape[0]
            if total >= size:
                break
        if total == 0:
            raise ValueError("data yielded no vectors")
        if not self.repeatable:
            self.pending = taken  # train on them too: a one-shot stream cannot be re-read
        return torch.cat(taken)[:size]

    def epoch(self) -> Iterator[torch.Tensor]:
        if self.tensor is not None:
            order = torch.randperm(self.tensor.shape[0], generator=self.generator).to(self.tensor.device)
            return (self.tensor[index] for index in order.split(self.batch_size))
        pending, self.pending = self.pending, []
        return chain(pending, map(self._prepare, self.new_iterable()))


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, with sklearn's 2 + log k local trials)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[int(torch.randint(n, (1,), generator=generator))]
    best = _sq_distances(x, centroids[:1]).squeeze(1)  # (n,) to the nearest chosen centroid
    for i in range(1, k):
        weights = best.double().cpu()
        if float(weights.sum()) > 0:
            candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)
        else:  # every point already sits on a centroid (fewer distinct points than codes)
            candidates = torch.randint(n, (trials,), generator=generator)
        candidates = candidates.to(x.device)
        new_best = torch.minimum(best[None], _sq_distances(x[candidates], x))  # (trials, n)
        winner = int(new_best.sum(dim=1).argmin())
        best = new_best[winner]
        centroids[i] = x[candidates[winner]]
    return centroids


def _update(x: torch.Tensor, codes: torch.Tensor, dist: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor,
            idle: torch.Tensor, reseed_after: int, generator: torch.Generator, metric: str) -> int:
    """One mini-batch step in place (Sculley 2010); returns how many dead codes were re-seeded."""
    k = centroids.shape[0]
    batch_counts = torch.bincount(codes, minlength=k).to(centroids.dtype)
    sums = torch.zeros_like(centroids).index_add_(0, codes, x)
    counts += batch_counts
    # Each centroid becomes the running mean of the vectors it has won: step = batch / total.
    rate = (batch_counts / counts.clamp(min=1)).unsqueeze(1)
    centroids += rate * (sums / batch_counts.clamp(min=1).unsqueeze(1) - centroids)
    if metric == "cosine":
        centroids.copy_(_normalise(centroids, metric))

    idle.add_(1).masked_fill_(batch_counts > 0, 0)
    # Vectors far from every centroid are the ones a new code would serve best: one each, drawn by error.
    dead = (idle >= reseed_after).nonzero().squeeze(1)[: int((dist > 0).sum())]
    if dead.numel() == 0:
        return 0
    chosen = torch.multinomial(dist.double().cpu(), dead.numel(), replacement=False, generator=generator)
    centroids[dead] = x[chosen.to(x.device)]
    counts[dead] = 0
    idle[dead] = 0
    return int(dead.numel())


def _sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, D), (k, D) -> (n, k) squared euclidean distances."""
    d = torch.addmm(c.pow(2).sum(dim=1).unsqueeze(0), x, c.T, alpha=-2)
    return d.add_(x.pow(2).sum(dim=1, keepdim=True)).clamp_(min=0)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance to it, for each row of x."""
    dist, codes = _sq_distances(x, centroids).min(dim=1)
    return codes, dist


def _normalise(x: torch.Tensor, metric: str) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1) if metric == "cosine" else x


def _check_finite(name: str, value: torch.Tensor) -> None:
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        position = tuple(int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"{name} must be finite, got {float(value[position])} at {position}")


def _check_centroids(name: str, value: Any, shape: tuple[int, int] | None = None) -> torch.Tensor:
    value = as_tensor(name, value)
    if value.ndim != 2 or (shape is not None and value.shape != shape):
        raise ValueError(f"{name} must have shape (num_codes, dim){'' if shape is None else f' = {shape}'}, "
                         f"got {tuple(value.shape)}")
    _check_finite(name, value)
    return value


def _check_description(description: Any) -> None:
    if not isinstance(description, str):
        raise TypeError(f"description must be a str, got {type(description).__name__}")
