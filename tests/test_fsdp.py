"""FSDP: the model sharded one `_no_split_modules` block at a time over two CPU processes (gloo) trains to
the weights one process reaches on the whole batch.

Accelerate 1.x runs FSDP only on accelerators (on a CPU it falls back to one process per rank, or to DDP),
so this drives torch's own `fully_shard` (FSDP2), the engine Accelerate's `fsdp_version: 2` uses, with
the wrap policy it derives from `_no_split_modules`; examples/accelerate_fsdp.yaml is the GPU launch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codegpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from codegpt import GPT, GPTConfig

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = GPT(GPTConfig(**CONFIG))
mesh = init_device_mesh("cpu", (world,))
for module in model.modules():
    if type(module).__name__ in model._no_split_modules:
        fully_shard(module, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.SGD(model.parameters(), lr=0.5)
ids = torch.load(sys.argv[1])
share = ids.shape[0] // world
for _ in range(STEPS):
    mine = ids[rank * share:(rank + 1) * share]
    model(mine, labels=mine).loss.backward()
    opt.step()
    opt.zero_grad()
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save(state, sys.argv[2])
dist.destroy_process_group()
"""

CONFIG = dict(vocab_size=17, seq_len=8, embed_dim=32, num_layers=2, num_heads=2, embd_dropout=0.0, resid_dropout=0.0)
STEPS = 3


def test_fsdp_over_two_cpu_processes_matches_one_process_on_the_whole_batch(tmp_path):
    ids = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 16  # the start token
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "fsdp.py"
    script.write_text(SCRIPT.replace("CONFIG", repr(CONFIG)).replace("STEPS", str(STEPS)))
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "ids.pt"),
           str(tmp_path / "sharded.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # SGD, not Adam: Adam scales float noise in gradients that are zero in exact arithmetic (the key
    # projection's bias, which softmax ignores) up to full-size steps, so the two runs could not agree.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(STEPS):  # both halves have as many targets, so the mean of their means is the batch mean
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    # The gathered state dict is the model's own: it loads strictly, and every weight matches.
    GPT(GPTConfig(**CONFIG)).load_state_dict(sharded, strict=True)
    expected = model.state_dict()
    assert sharded.keys() == expected.keys()
    assert not torch.equal(expected["h.0.mlp.fc.weight"], initial["h.0.mlp.fc.weight"])  # it trained
    for key in expected:
        torch.testing.assert_close(sharded[key], expected[key], atol=2e-5, rtol=1e-4, msg=key)
