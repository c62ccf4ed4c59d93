"""VMM-scVI started from a trained SCVI (``VMMSCVI.from_scvi_model``) vs VMM-scVI from scratch, on kang_ifnb_2800.

Data: 2000 seurat_v3 HVGs (batch-aware, batch = ``obs["batch"]``), all cells.  Arms:
- ``scvi``: ``scvi.model.SCVI(adata, n_latent=10).train()`` at scvi-tools' defaults (its own 400-epoch heuristic);
- ``from_scvi``: that SCVI's networks copied into a VMMSCVI (K = 100 random-cell pseudo-inputs), then
  ``train(max_epochs=--finetune-epochs)``; its time to a result counts the SCVI training too;
- ``scratch``: ``VMMSCVI(adata, n_latent=10).train()`` at its defaults.
Both VMMs: n_latent 10, 1 x 128 hidden, ZINB; the batch in the encoder as each starts (``from_scvi``: SCVI's
encoder, without it; ``scratch``: the VMM default, with it).  Scores: the number of
clusters in use, NMI of the clusters vs ``obs["cell_type"]``, and the scIB table (``pyro_vmm.evaluation.scib_table``)
of each embedding (SCVI's latent included for reference).

Run from the repository root:  OMP_NUM_THREADS=1 python benchmarks/from_scvi.py [--seed 0] [--finetune-epochs 50]
Prints a table and writes benchmarks/results/from_scvi.json (``--out``) and its scIB log beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks") / "results"
DATA = Path("../shared/data/scrna/kang_ifnb_2800.h5ad")  # from the repository root


def clusters_summary(assign: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import normalized_mutual_info_score

    return {"n_clusters": int(np.unique(assign).size), "nmi": float(normalized_mutual_info_score(labels, assign))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-epochs", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS / "from_scvi.json"))
    parser.add_argument("--quick", action="store_true", help="2 epochs per arm (a smoke test of the script)")
    args = parser.parse_args()

    import scvi
    import torch

    from pyro_vmm import VMMSCVI
    from pyro_vmm.data.scrna import read_counts, select_hvg
    from pyro_vmm.evaluation import scib_table
    from pyro_vmm.quiet import quiet_lightning

    torch.set_num_threads(1)
    adata = select_hvg(read_counts(args.data), n_top_genes=2000, batch_key="batch")
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    rows: dict[str, dict] = {}

    scvi.settings.seed = args.seed
    t0 = time.perf_counter()
    a_scvi = adata.copy()
    scvi.model.SCVI.setup_anndata(a_scvi, batch_key="batch")
    scvi_model = scvi.model.SCVI(a_scvi, n_latent=10)
    with quiet_lightning():  # Lightning's tips off the terminal, as in VMMSCVI.train
        scvi_model.train(max_epochs=2 if args.quick else None, enable_progress_bar=False)
    t_scvi = time.perf_counter() - t0
    adata.obsm["X_scvi"] = scvi_model.get_latent_representation()
    rows["scvi"] = {"time_s": t_scvi, "epochs": len(scvi_model.history["elbo_train"])}

    t0 = time.perf_counter()
    ft = VMMSCVI.from_scvi_model(scvi_model, adata=adata.copy(), prior="vmm", n_clusters=100, seed=args.seed)
    ft.train(max_epochs=args.finetune_epochs, seed=args.seed, enable_progress_bar=False)
    t_ft = time.perf_counter() - t0
    adata.obsm["X_from_scvi"] = ft.get_latent_representation()
    rows["from_scvi"] = {
        "time_s": t_scvi + t_ft, "finetune_s": t_ft, "epochs": len(ft.history["elbo_train"]),
        **clusters_summary(ft.get_cluster_assignments(), labels),
    }

    t0 = time.perf_counter()
    a_vmm = adata.copy()
    VMMSCVI.setup_anndata(a_vmm, batch_key="batch")
    scratch = VMMSCVI(a_vmm, prior="vmm", n_clusters=100, n_latent=10, seed=args.seed)
    scratch.train(max_epochs=2 if args.quick else None, seed=args.seed, enable_progress_bar=False)
    t_scratch = time.perf_counter() - t0
    adata.obsm["X_scratch"] = scratch.get_latent_representation()
    rows["scratch"] = {
        "time_s": t_scratch, "epochs": len(scratch.history["elbo_train"]),
        **clusters_summary(scratch.get_cluster_assignments(), labels),
    }

    keys = {"scvi": "X_scvi", "from_scvi": "X_from_scvi", "scratch": "X_scratch"}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = out_path.with_name(f"{out_path.stem}_scib.log")  # this run's scib-metrics log, beside the JSON
    log.unlink(missing_ok=True)
    table = scib_table(adata, "batch", "cell_type", list(keys.values()), n_jobs=1, log_file=log)
    for arm, key in keys.items():
        rows[arm]["scib"] = {k: float(v) for k, v in table.loc[key].items()}

    print(f"{'arm':<10} {'time_s':>8} {'epochs':>7} {'clusters':>9} {'NMI':>6} {'bio':>6} {'batch':>6} {'total':>6}")
    for arm, r in rows.items():
        s = r["scib"]
        print(f"{arm:<10} {r['time_s']:8.1f} {r['epochs']:7d} {r.get('n_clusters', float('nan')):9} "
              f"{r.get('nmi', float('nan')):6.3f} {s['Bio conservation']:6.3f} {s['Batch correction']:6.3f} "
              f"{s['Total']:6.3f}")
    out = {"command": f"OMP_NUM_THREADS=1 python benchmarks/from_scvi.py --seed {args.seed} "
                      f"--finetune-epochs {args.finetune_epochs}", "n_cells": int(adata.n_obs),
           "n_genes": int(adata.n_vars), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
