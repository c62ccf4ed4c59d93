"""Is the likelihood right?  Our Pyro scVI with prior="normal" vs scvi-tools' SCVI: validation ELBO on kang_ifnb_2800.

Same data (2000 seurat_v3 HVGs, batch-aware), same split (scvi-tools' DataSplitter, ``scvi.settings.seed``, 90/10),
same architecture (encoder on log1p(x) + one-hot batch, decoder on z + one-hot batch, no deep injection, 1 x 128
hidden, 10 latent, ZINB, per-gene dispersion, observed library size), same optimiser (Adam lr 1e-3, eps 1e-7, no
weight decay), no KL warm-up, batch size 128, a fixed number of epochs without early stopping.

Reported per model: the validation negative ELBO per cell logged each epoch (``elbo_validation``; the mean of the last
5 epochs and the minimum over epochs), ``get_elbo(indices=validation cells)`` after training and, with
``--mc-samples S`` (default 1000; 0 skips it), the importance-sampled marginal log-likelihood
``get_marginal_ll(indices=validation cells, n_mc_samples=S)`` of both libraries (log p(x) per cell, higher is better;
it compares the models on the evidence itself rather than on a bound).  Acceptance: our N(0, I) value within 2 % of
SCVI's.  ``--priors normal vmm`` adds rows for our model with other priors (same data, split and settings).

Run from the repository root:  python benchmarks/scvi_elbo_parity.py [--epochs 100] [--threads 2]
Writes benchmarks/results/scvi_elbo_parity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path("benchmarks") / "results"


def load_data(n_genes: int):
    from pyro_vmm.data.scrna import load_shared, select_hvg

    return select_hvg(load_shared("kang_ifnb_2800"), n_top_genes=n_genes, batch_key="batch")


def run_scvi(adata, epochs: int, seed: int, mc_samples: int) -> dict:
    import scvi

    scvi.settings.seed = seed
    a = adata.copy()
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(
        a,
        n_hidden=128,
        n_latent=10,
        n_layers=1,
        dropout_rate=0.1,
        gene_likelihood="zinb",
        dispersion="gene",
        encode_covariates=True,
        deeply_inject_covariates=False,
    )
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=128,
        train_size=0.9,
        early_stopping=False,
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
        plan_kwargs=dict(lr=1e-3, eps=1e-7, weight_decay=0.0, n_epochs_kl_warmup=None, n_steps_kl_warmup=None),
    )
    seconds = time.perf_counter() - t0
    curve = np.asarray(model.history["elbo_validation"], dtype=float).ravel()
    # get_elbo returns the ELBO itself (negative, as ours); we report the negative ELBO like elbo_validation
    final = -float(model.get_elbo(indices=model.validation_indices, batch_size=128))
    mll = None
    if mc_samples:
        mll = float(model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=mc_samples, batch_size=128))
    return {"curve": curve.tolist(), "get_elbo": final, "marginal_ll": mll, "seconds": seconds,
            "val_idx": model.validation_indices}


def run_ours(adata, epochs: int, seed: int, mc_samples: int, prior: str = "normal") -> dict:
    from pyro_vmm import VMMSCVI

    a = adata.copy()
    VMMSCVI.setup_anndata(a, batch_key="batch")
    model = VMMSCVI(a, prior=prior, n_latent=10, n_hidden=128, n_layers=1, gene_likelihood="zinb", seed=seed)
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=128,
        lr=1e-3,
        train_size=0.9,
        early_stopping=False,
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
        seed=seed,
    )
    seconds = time.perf_counter() - t0
    curve = model.history["elbo_validation"].to_numpy(dtype=float).ravel()
    final = -float(model.get_elbo(indices=model.validation_indices, batch_size=128))  # the loss, as SCVI's row
    mll = None
    if mc_samples:
        torch.manual_seed(seed)
        mll = model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=mc_samples, batch_size=128)
    return {"curve": curve.tolist(), "get_elbo": final, "marginal_ll": mll, "seconds": seconds,
            "val_idx": model.validation_indices}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mc-samples", type=int, default=1000, help="importance samples for log p(x); 0: skip")
    parser.add_argument("--priors", nargs="+", default=["normal"], choices=("normal", "vmm", "gmm", "vampprior"),
                        help="priors of our model to run (normal is the parity check and always runs)")
    args = parser.parse_args(argv)
    if args.mc_samples < 0:
        parser.error("--mc-samples must be >= 0")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    adata = load_data(args.genes)
    scvi_res = run_scvi(adata, args.epochs, args.seed, args.mc_samples)
    priors = ["normal"] + [p for p in args.priors if p != "normal"]
    ours = {p: run_ours(adata, args.epochs, args.seed, args.mc_samples, prior=p) for p in priors}
    splits = [np.sort(r.pop("val_idx")) for r in (scvi_res, *ours.values())]
    same_split = all(np.array_equal(splits[0], other) for other in splits[1:])

    rows = []
    runs = [("scvi-tools SCVI", scvi_res)] + [(f'VMMSCVI prior="{p}"', r) for p, r in ours.items()]
    for name, r in runs:
        curve = np.asarray(r["curve"])
        rows.append(
            {
                "model": name,
                "elbo_validation_last5": float(curve[-5:].mean()),
                "elbo_validation_min": float(curve.min()),
                "get_elbo_validation": r["get_elbo"],
                "marginal_ll_validation": r["marginal_ll"],
                "train_seconds": r["seconds"],
                "elbo_validation_curve": r["curve"],
            }
        )
    ref = rows[0]
    for r in rows:
        for key in ("elbo_validation_last5", "elbo_validation_min", "get_elbo_validation"):
            r[f"{key}_rel_diff"] = (r[key] - ref[key]) / abs(ref[key])
    within = all(abs(rows[1][f"{k}_rel_diff"]) <= 0.02 for k in ("elbo_validation_last5", "get_elbo_validation"))

    print(f"\nkang_ifnb_2800, {adata.n_obs} cells x {adata.n_vars} HVGs, {args.epochs} epochs, batch 128, "
          f"same validation cells: {same_split}")
    print(f"{'model':<26} {'val -ELBO last5':>16} {'min':>10} {'get_elbo(val)':>14} {'rel diff':>9} "
          f"{'log p(x) (val)':>15} {'train s':>8}")
    for r in rows:
        mll = r["marginal_ll_validation"]
        print(
            f"{r['model']:<26} {r['elbo_validation_last5']:>16.2f} {r['elbo_validation_min']:>10.2f} "
            f"{r['get_elbo_validation']:>14.2f} {100 * r['elbo_validation_last5_rel_diff']:>8.2f}% "
            f"{'-' if mll is None else f'{mll:.2f}':>15} {r['train_seconds']:>8.0f}"
        )
    print(f"within 2 %: {within}")

    from pyro_vmm.utils import atomic_path, benchmark_header

    out = {
        **benchmark_header("scvi_elbo_parity", sys.argv),
        "data": {"name": "kang_ifnb_2800", "n_cells": adata.n_obs, "n_genes": adata.n_vars, "hvg": "seurat_v3"},
        "settings": vars(args),
        "same_validation_cells": same_split,
        "within_2_percent": within,
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS / "scvi_elbo_parity.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
