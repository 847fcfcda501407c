"""Shared test settings."""

import os

# Tests use tiny models: one intra-op thread is faster for them, and with two threads on a shared
# 2-core machine every op waits for a busy core. Subprocesses (accelerate launch, remote-code loads)
# inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

from codegpt import GPT, GPTConfig  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second thread only adds fork/join waits, which cost whole scheduler time slices
    when the machine is shared. Restores the thread count it found."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(seed: int = 0, conditional: bool = True, sharpen: float = 1.0, **overrides) -> GPT:
    """A 3x4-code model in eval mode; ``sharpen`` scales the head so that the next-token distribution is
    peaked enough for top-k and top-p to matter (a fresh model's is almost uniform)."""
    kw = dict(
        vocab_size=17,
        seq_len=12,
        embed_dim=32,
        num_layers=2,
        num_heads=4,
        class_conditional=conditional,
        num_classes=3 if conditional else 0,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**kw)).eval()
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
