"""Shared test settings and fixtures: one thread, a clean Accelerate state, tiny configs, code
datasets and run folders."""

import os

# Tests use tiny models: one intra-op thread is faster for them, and with two threads on a shared
# 2-core machine every op waits for a busy core. Subprocesses (accelerate launch, remote-code loads)
# inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from codegpt import GPT, GPTConfig  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = Path(__file__).resolve().parents[1]


def make_config(**overrides) -> GPTConfig:
    """A small class-conditional GPTConfig: 16 codes of a 16-code codebook, 3 classes, width 32, 2 layers,
    4 heads. With ``class_conditional=False`` and no ``num_classes``, 0 classes."""
    kw = dict(vocab_size=17, seq_len=16, embed_dim=32, num_layers=2, num_heads=4, class_conditional=True,
              num_classes=3)
    kw.update(overrides)
    if not kw["class_conditional"] and "num_classes" not in overrides:
        kw["num_classes"] = 0
    return GPTConfig(**kw)


def make_model(seed: int = 0, **overrides) -> GPT:
    """A ``make_config`` GPT in eval mode, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return GPT(make_config(**overrides)).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread makes every op wait for a free core and buys nothing.
    Restored after each test, whatever the test (or a library it calls) set."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reset_accelerate() -> None:
    """Accelerate keeps one process-wide state that a later Accelerator cannot change (e.g. fp32,
    then bf16); tests that train in-process start from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """A clean Accelerate state before and after the test; yields the reset, for tests that train
    twice with different settings."""
    reset_accelerate()
    yield reset_accelerate
    reset_accelerate()


@pytest.fixture
def random_codes():
    """``random_codes(n, grid, codebook_size, num_classes, seed)``: uniform codes (n, H, W) and labels (n,)."""

    def make(n=40, grid=(3, 5), codebook_size=300, num_classes=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, codebook_size, (n, *grid), generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        return codes, labels

    return make


def _learnable_dataset(path: Path, n: int = 96, codebook_size: int = 16, grid=(2, 4), num_classes: int = 3,
                       seed: int = 0):
    from codegpt.data import CodeDataset, write_code_dataset

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    H, W = grid
    codes = torch.empty(n, H * W, dtype=torch.long)
    for i in range(n):
        base = 4 * int(labels[i]) % codebook_size
        for j in range(H * W):
            fresh = base + int(torch.randint(0, 4, (), generator=g))
            repeat = j > 0 and bool(torch.rand((), generator=g) < 0.5)
            codes[i, j] = codes[i, j - 1] if repeat else fresh
    write_code_dataset(path, codes.reshape(n, H, W), labels, codebook_size=codebook_size, num_classes=num_classes)
    return CodeDataset(path)


@pytest.fixture
def learnable_dataset():
    """``learnable_dataset(path, n, codebook_size, grid, num_classes, seed)``: a CodeDataset with
    structure a model can learn: each class draws from its own few codes, and every code repeats
    its left neighbour half of the time."""
    return _learnable_dataset


@pytest.fixture
def tiny_config():
    """``tiny_config(dataset=None, **overrides)``: ``make_config`` with 2 heads, sized for ``dataset`` (a
    CodeDataset) when one is given."""

    def make(dataset=None, **overrides):
        conditional = overrides.get("class_conditional", True)
        sized = {} if dataset is None else dict(vocab_size=dataset.vocab_size, seq_len=dataset.seq_len,
                                                 num_classes=dataset.num_classes if conditional else 0)
        return make_config(**{"num_heads": 2, **sized, **overrides})

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished run folder of codegpt.training (a few steps on learnable codes, two checkpoints,
    evaluations): the real layout, for tests that read runs. Shared: do not modify it."""
    from codegpt import GPTConfig
    from codegpt.data import CodeDataset, split_indices, write_code_dataset
    from codegpt.training import TrainingArguments, train

    root = tmp_path_factory.mktemp("trained_run")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (48,), generator=g)
    codes = (4 * labels[:, None, None] + torch.randint(0, 4, (48, 2, 4), generator=g)) % 16
    dataset = CodeDataset(write_code_dataset(root / "data", codes, labels, codebook_size=16, num_classes=3))
    train_idx, val_idx = split_indices(len(dataset), 0.25, seed=0)
    config = GPTConfig(vocab_size=17, seq_len=8, embed_dim=32, num_layers=1, num_heads=2, class_conditional=True,
                       num_classes=3)
    args = TrainingArguments(output_dir=root / "run", max_steps=4, per_device_batch_size=8, warmup_steps=1,
                             eval_every=2, save_every=2, progress=False, samples_per_class=1)
    reset_accelerate()
    try:
        train(args, config, torch.utils.data.Subset(dataset, train_idx), torch.utils.data.Subset(dataset, val_idx))
    finally:
        reset_accelerate()
    return root / "run"

def _tiny_model(seed: int = 0, conditional: bool = True, sharpen: float = 1.0, **overrides) -> GPT:
    """A 3x4-code ``make_model``; ``sharpen`` scales the head so that the next-token distribution is
    peaked enough for top-k and top-p to matter (a fresh model's is almost uniform)."""
    model = make_model(seed, **{"seq_len": 12, "class_conditional": conditional, **overrides})
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def _start_ids(model: GPT, batch: int) -> torch.Tensor:
    return torch.full((batch, 1), model.config.start_token_id, dtype=torch.long)


def _prefix_ids(model: GPT, batch: int, codes: int, seed: int = 1) -> torch.Tensor:
    """The start token, then ``codes`` random codes (seeded), in each of ``batch`` rows."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, model.config.codebook_size, (batch, codes), generator=g)
    return torch.cat([_start_ids(model, batch), prefix], dim=1)


@pytest.fixture
def tiny_model():
    """``tiny_model(seed=0, conditional=True, sharpen=1.0, **config_overrides)`` builds a tiny GPT."""
    return _tiny_model


@pytest.fixture
def start_ids():
    """``start_ids(model, batch)``: ``(batch, 1)`` start tokens."""
    return _start_ids


@pytest.fixture
def prefix_ids():
    """``prefix_ids(model, batch, codes, seed=1)``: prompts of the start token and random codes."""
    return _prefix_ids


@pytest.fixture
def hub_repo(trained_run, tmp_path, monkeypatch):
    """A Hub model ``toy-org/toy-prior`` in a hand-made Hugging Face cache, offline (HF_HUB_OFFLINE=1): two
    commits, each the upload folder of ``codegpt push`` (model + a 16-code patch codebook in codebook/), ``old``
    holding ``trained_run``'s checkpoint at step 2 and ``new`` (main) its final model."""
    from types import SimpleNamespace

    import huggingface_hub.constants

    from codegpt.codebook import Codebook
    from codegpt.hub import prepare_upload_folder

    g = torch.Generator().manual_seed(0)
    Codebook.fit(torch.randn(400, 4, generator=g), 16, seed=0, progress=False).save_pretrained(tmp_path / "codebook")
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--toy-org--toy-prior"
    old, new = "1" * 40, "2" * 40
    for commit, source in ((old, trained_run / "checkpoints" / "step-000002"), (new, trained_run)):
        prepare_upload_folder(source, repo / "snapshots" / commit, repo_id="toy-org/toy-prior",
                              codebook_dir=tmp_path / "codebook", metrics={})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf")), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, value)
    # huggingface_hub reads both when imported: set them where it looks.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return SimpleNamespace(repo_id="toy-org/toy-prior", old=old, new=new, snapshots=repo / "snapshots",
                           codebook=tmp_path / "codebook")


_KILL_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from codegpt import GPTConfig
from codegpt.data import CodeDataset
from codegpt.training import TrainingArguments, train

class Slow(torch.utils.data.Dataset):
    # Slow enough that the kill lands mid-run, between checkpoints.
    def __init__(self, base): self.base = base
    def __len__(self): return len(self.base)
    def __getitem__(self, i):
        time.sleep(0.004)
        return self.base[i]

data, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
ds = CodeDataset(data)
config = GPTConfig(vocab_size=ds.vocab_size, seq_len=ds.seq_len, embed_dim=32, num_layers=2, num_heads=2,
                   class_conditional=True, num_classes=ds.num_classes, embd_dropout=0.2, resid_dropout=0.2,
                   class_dropout_prob=0.3, tie_word_embeddings=True)
args = TrainingArguments(output_dir=out, max_steps=30, per_device_batch_size=8, learning_rate=3e-3,
                         warmup_steps=5, save_every=4, save_total_limit=2, progress=False, resume=resume,
                         samples_per_class=1, **EXTRA)
train(args, config, Slow(ds), *([ds] if EVALUATE else []))
"""


def sigkill_and_resume(tmp_path: Path, extra: dict | None = None, evaluate: bool = False) -> tuple[Path, Path]:
    """The same 30-step run trained twice in subprocesses (40 learnable items: the kill and the resume cross
    epochs): one to the end, one killed with SIGKILL after its step-8 checkpoint and resumed. ``extra`` are
    more TrainingArguments, ``evaluate`` scores the training set as held-out data. Returns (the uninterrupted
    run, the resumed run), having checked that the kill and the resume happened."""
    import signal
    import subprocess
    import sys
    import time

    from codegpt.runs import newest_checkpoint

    _learnable_dataset(tmp_path / "data", n=40)
    script = tmp_path / "train_script.py"
    script.write_text(_KILL_SCRIPT.replace("EXTRA", repr(extra or {})).replace("EVALUATE", repr(evaluate)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(out: Path, mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), str(out), mode], env=env,
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    full, killed = tmp_path / "full", tmp_path / "killed"
    reference, victim = run(full, "fresh"), run(killed, "fresh")
    deadline = time.monotonic() + 120
    while newest_checkpoint(killed) is None or newest_checkpoint(killed).name < "step-000008":
        assert victim.poll() is None, f"finished before it could be killed:\n{victim.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.15)  # into the steps after the checkpoint, maybe into the next save
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "model").exists(), "the run was not killed mid-way"
    killed_at = newest_checkpoint(killed)
    assert killed_at is not None and killed_at.name < "step-000030"

    resumed = run(killed, "resume")
    out_resumed, _ = resumed.communicate(timeout=180)
    out_full, _ = reference.communicate(timeout=180)
    assert reference.returncode == 0, out_full
    assert resumed.returncode == 0, out_resumed
    assert f"resumed from {killed_at}" in out_resumed
    return full, killed
