"""Shared test settings."""

import os

# Tests use tiny models: one intra-op thread is faster for them, and with two threads on a shared
# 2-core machine every op waits for a busy core. Subprocesses (accelerate launch, remote-code loads)
# inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
