"""Per-epoch training time: VMM-scVI (Pyro, VI + EM step per minibatch) vs scvi-tools' SCVI, same networks and data.

Data: kang_ifnb_2800 (2800 cells, 2 batches), 2000 seurat_v3 HVGs (batch-aware); batch size 128; 90/10 split
(validation not run while timing).  SCVI: ``encode_covariates=True, deeply_inject_covariates=False`` (our
architecture), ZINB, gene dispersion, no KL warm-up.  Each model trains ``--epochs`` epochs after ``--warmup`` epochs
that are not timed; the median epoch time is reported.

Run from the repository root:  python benchmarks/scvi_epoch_time.py [--epochs 8] [--threads 2]
Writes benchmarks/results/scvi_epoch_time.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

RESULTS = Path("benchmarks") / "results"


def epoch_timer():
    from pyro_vmm.callbacks import EpochTimer

    return EpochTimer()


def load_data(n_genes: int):
    from pyro_vmm.data.scrna import load_shared, select_hvg

    adata = load_shared("kang_ifnb_2800")
    return select_hvg(adata, n_top_genes=n_genes, batch_key="batch")


def time_scvi(adata, epochs: int, warmup: int, seed: int) -> list[float]:
    import scvi

    scvi.settings.seed = seed
    a = adata.copy()
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(
        a,
        n_hidden=128,
        n_latent=10,
        n_layers=1,
        gene_likelihood="zinb",
        encode_covariates=True,
        deeply_inject_covariates=False,
    )
    timer = epoch_timer()
    model.train(
        max_epochs=warmup + epochs,
        batch_size=128,
        train_size=0.9,
        early_stopping=False,
        enable_progress_bar=False,
        plan_kwargs=dict(lr=1e-3, n_epochs_kl_warmup=None, weight_decay=0.0, eps=1e-7),
        callbacks=[timer],
    )
    return timer.wall[warmup:], timer.cpu[warmup:]


def time_vmm(adata, prior: str, k: int, epochs: int, warmup: int, seed: int) -> list[float]:
    from pyro_vmm import VMMSCVI

    a = adata.copy()
    VMMSCVI.setup_anndata(a, batch_key="batch")
    model = VMMSCVI(a, prior=prior, n_clusters=k, n_latent=10, n_hidden=128, n_layers=1, seed=seed)
    timer = epoch_timer()
    model.train(
        max_epochs=warmup + epochs,
        batch_size=128,
        train_size=0.9,
        early_stopping=False,
        enable_progress_bar=False,
        check_val_every_n_epoch=10**6,
        seed=seed,
        callbacks=[timer],
    )
    return timer.wall[warmup:], timer.cpu[warmup:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    adata = load_data(args.genes)
    rows = []
    runs = [("scvi-tools SCVI", lambda: time_scvi(adata, args.epochs, args.warmup, args.seed))]
    for prior in ("vmm", "normal"):
        runs.append(
            (
                f"VMMSCVI prior={prior}",
                lambda p=prior: time_vmm(adata, p, args.clusters, args.epochs, args.warmup, args.seed),
            )
        )
    for name, fn in runs:
        times, cpu = fn()
        rows.append(
            {
                "model": name,
                "median_s_per_epoch": statistics.median(times),
                "median_cpu_s_per_epoch": statistics.median(cpu),
                "epoch_times_s": times,
                "epoch_cpu_times_s": cpu,
            }
        )
    base, base_cpu = rows[0]["median_s_per_epoch"], rows[0]["median_cpu_s_per_epoch"]
    for r in rows:
        r["ratio_to_scvi"] = r["median_s_per_epoch"] / base
        r["cpu_ratio_to_scvi"] = r["median_cpu_s_per_epoch"] / base_cpu

    n_steps = -(-int(0.9 * adata.n_obs + 0.5) // 128)
    print(f"\nkang_ifnb_2800, {adata.n_obs} cells x {adata.n_vars} genes, batch 128 (~{n_steps} steps/epoch), "
          f"K={args.clusters}, {args.epochs} timed epochs, torch threads={args.threads}")
    print(f"{'model':<24} {'wall s/epoch':>13} {'ratio':>6} {'CPU s/epoch':>12} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['model']:<24} {r['median_s_per_epoch']:>13.3f} {r['ratio_to_scvi']:>6.2f} "
            f"{r['median_cpu_s_per_epoch']:>12.3f} {r['cpu_ratio_to_scvi']:>6.2f}"
        )

    from pyro_vmm.utils import atomic_path, benchmark_header

    out = {
        **benchmark_header("scvi_epoch_time", sys.argv),
        "data": {"name": "kang_ifnb_2800", "n_cells": adata.n_obs, "n_genes": adata.n_vars, "hvg": "seurat_v3"},
        "settings": vars(args),
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)

    with atomic_path(RESULTS / "scvi_epoch_time.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
