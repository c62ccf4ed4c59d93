"""Data-parallel training through Lightning's DDP strategy: 2 CPU processes (gloo) on a small real subset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vmm.scvi._data import MinibatchSampler

WORKER = Path(__file__).with_name("_ddp_train.py")


@pytest.mark.parametrize("n, world, batch_size", [(300, 2, 32), (301, 2, 32), (100, 3, 7)])
def test_sampler_gives_ranks_disjoint_equal_shares(monkeypatch, n, world, batch_size):
    shares = []
    for rank in range(world):
        monkeypatch.setattr(MinibatchSampler, "_replica", staticmethod(lambda r=rank: (r, world)))
        sampler = MinibatchSampler(n, batch_size, shuffle=True, seed=3)
        sampler.set_epoch(1)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        shares.append(torch.cat(batches))
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == n // world
    union = torch.cat(shares)
    assert len(torch.unique(union)) == len(union) == n - n % world  # disjoint, nothing but the remainder left out


@pytest.mark.slow
@pytest.mark.parametrize("source", ["memory", "streamed"])
def test_two_process_ddp_keeps_ranks_identical(shared_data, tmp_path, source):
    """Both ranks end identical, in memory and when each rank streams its minibatches from a backed file."""
    extra = []
    if source == "streamed":
        from _data import kang_subset

        kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad").write_h5ad(tmp_path / "small.h5ad")
        extra = [str(tmp_path / "small.h5ad")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), str(shared_data), *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["streamed"] == r1["streamed"] == (source == "streamed")
    # each rank trained on its own half of the ~270 training cells per epoch (2 epochs), in batches of 32
    assert r0["steps"] == r1["steps"] > 0 and sum(r0["cells"]) == sum(r1["cells"])
    assert 2 * 100 < sum(r0["cells"]) < 2 * 150
    # parameters (networks and EM-fitted prior) agree across ranks after every single step ...
    assert r0["max_prior_gap"] == 0.0 and r0["max_network_gap"] == 0.0
    # ... and the final state (BatchNorm statistics included) is identical, and trained
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    for key in ("mean_encoder.weight", "prior.logits_unconstrained", "prior.pseudo_inputs_unconstrained"):
        assert not torch.equal(r0["state"][key], r0["init"][key])
