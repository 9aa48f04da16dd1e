"""Two "machines" on loopback: two torchrun agents (--nnodes 2 --nproc_per_node 1) meet through c10d
rendezvous and train together; the loss trajectory equals one process with the same global batch
(1e-5 absolute: float32, only the gradient summation order differs)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import free_port, make_data_dir, tiny_config, train_losses

from llmkit.train.trainer import Trainer

SETTINGS = dict(batch_size=8, max_steps=4, lr_decay_steps=4, eval_interval=2)


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_match_one_process(tmp_path):
    data = make_data_dir(tmp_path)
    config = tiny_config(data, tmp_path / "single", **SETTINGS)
    Trainer(config).fit()
    overrides = [f"{k}={v}" for k, v in config.to_dict().items() if k not in ("model", "out_dir") and v is not None]
    overrides += [f"model.{k}={v}" for k, v in config.model.items()] + [f"out_dir={tmp_path / 'nodes'}"]
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    # the same command on each machine; only the first one's address is needed (it hosts the store)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "llmkit-test",
           "-m", "llmkit.cli", "train", *overrides]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert sum(out.count("model saved to") for out, _ in outputs) == 1  # global rank 0 only
    single, multi = train_losses(tmp_path / "single"), train_losses(tmp_path / "nodes")
    assert sorted(multi) == sorted(single) == [1, 2, 3, 4]
    for step, loss in single.items():
        assert multi[step] == pytest.approx(loss, abs=1e-5), step
