"""Worker of tests/test_ddp.py: train VMM-scVI with Lightning DDP on 2 CPU processes (gloo) and save each rank's state.

    python tests/_ddp_train.py OUT_DIR DATA_DIR [BACKED_H5AD]

With ``BACKED_H5AD`` (the same cells, written by the test beforehand) each rank opens that file backed and streams its
minibatches from it.

Lightning re-runs this script for rank 1; each rank writes ``OUT_DIR/rank{r}.pt`` with its final ``state_dict``, the
initial one, the global step, the cells it trained on and the largest difference of the prior parameters between
ranks seen after any step (all-gathered).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from _data import kang_subset

from pyro_vmm import VMMSCVI


class RankConsistency(pl.Callback):
    """After every training step, all-gather the prior and network parameters and record the largest gap."""

    def __init__(self) -> None:
        self.max_prior_gap = 0.0
        self.max_network_gap = 0.0
        self.steps = 0
        self.cells: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.cells.append(int(batch["X"].shape[0]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        for prefix, attr in (("prior.", "max_prior_gap"), ("", "max_network_gap")):
            flat = torch.cat([
                p.detach().reshape(-1) for n, p in pl_module.module.named_parameters()
                if n.startswith("prior.") == (prefix == "prior.")
            ])
            gathered = [torch.empty_like(flat) for _ in range(trainer.world_size)]
            torch.distributed.all_gather(gathered, flat)
            gap = max(float((g - gathered[0]).abs().max()) for g in gathered)
            setattr(self, attr, max(getattr(self, attr), gap))


def main() -> None:
    out, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if len(sys.argv) > 3:
        import anndata

        adata = anndata.read_h5ad(sys.argv[3], backed="r")
    else:
        adata = kang_subset(data_dir / "scrna" / "kang_ifnb_2800.h5ad")
    VMMSCVI.setup_anndata(adata, batch_key="batch")
    model = VMMSCVI(adata, prior="vmm", seed=0, n_latent=4, n_hidden=32, n_clusters=8)
    init = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    check = RankConsistency()
    model.train(max_epochs=2, batch_size=32, seed=0, accelerator="cpu", devices=2, strategy="ddp",
                enable_progress_bar=False, early_stopping=False, callbacks=[check])
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save(
        {"state": model.module.state_dict(), "init": init, "steps": check.steps, "cells": check.cells,
         "max_prior_gap": check.max_prior_gap, "max_network_gap": check.max_network_gap,
         "world_size": model.trainer.world_size, "streamed": bool(adata.isbacked)},
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
