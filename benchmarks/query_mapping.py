"""Reference mapping: VMM-scVI (``VMMSCVI.load_query_data``) vs scvi-tools' scArches SCVI, on kang_ifnb_2800.

Reference = the control cells (one batch), query = the IFN-beta-stimulated cells (a batch the reference never saw).
Both models: 2000 seurat_v3 HVGs (batch-aware, from all cells), 1 x 128 hidden, latent 10, ZINB, batch one-hot into
encoder and decoder, batch size 128, Adam lr 1e-3, no KL warm-up, ``--ref-epochs`` on the reference then
``--query-epochs`` on the query training only the new batch's weights (scvi-tools' ``load_query_data`` defaults;
ours: see ``pyro_vmm.scvi._query``).  VMM: K = 100, prior LR ratio ``--prior-lr-ratio``, the prior frozen for the query.

Scores for the query cells (labels are never used in training):
- ``knn_acc``: label transfer by a 15-nearest-neighbour vote among the reference cells in the latent space,
- ``knn_macro_f1``: the same, macro-averaged F1 over cell types,
- ``cluster_acc`` (VMM only): each query cell takes the majority reference label of its VMM cluster,
- ``ref_max_abs_diff``: the largest change of a reference cell's latent coordinate between the reference model and
  the query model (0 up to float rounding: the new batch's weights start at zero and the old ones are frozen).

Run from the repository root:  python benchmarks/query_mapping.py [--seeds 0 1 2] [--threads 1]
Writes benchmarks/results/query_mapping.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path("benchmarks") / "results"
ARCH = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "gene_likelihood": "zinb"}


def transfer_scores(z_ref, labels_ref, z_query, labels_query) -> dict:
    from pyro_vmm.evaluation import knn_label_transfer, label_transfer_scores

    pred = knn_label_transfer(z_ref, labels_ref, z_query, k=15).labels
    scores = label_transfer_scores(labels_query, pred)
    return {"knn_acc": scores["accuracy"], "knn_macro_f1": scores["macro_f1"]}


def run_vmm(ref, query, args, seed: int) -> dict:
    import pandas as pd

    from pyro_vmm import VMMSCVI

    r, q = ref.copy(), query.copy()
    VMMSCVI.setup_anndata(r, batch_key="batch", labels_key="cell_type")
    t0 = time.perf_counter()
    model = VMMSCVI(r, prior="vmm", n_clusters=100, seed=seed, **ARCH)
    model.train(max_epochs=args.ref_epochs, batch_size=128, prior_lr_ratio=args.prior_lr_ratio, seed=seed,
                early_stopping=False, enable_progress_bar=False)
    t1 = time.perf_counter()
    z_ref, c_ref = model.get_latent_representation(), model.get_cluster_assignments()
    qm = VMMSCVI.load_query_data(q, model)
    qm.train(max_epochs=args.query_epochs, batch_size=128, seed=seed, early_stopping=False,
             enable_progress_bar=False)
    t2 = time.perf_counter()
    labels_ref = r.obs["cell_type"].astype(str).to_numpy()
    labels_q = q.obs["cell_type"].astype(str).to_numpy()
    out = transfer_scores(z_ref, labels_ref, qm.get_latent_representation(), labels_q)
    majority = pd.crosstab(c_ref, labels_ref).idxmax(axis=1)
    c_q = qm.get_cluster_assignments()
    out["cluster_acc"] = float((np.array([majority.get(c, "") for c in c_q]) == labels_q).mean())
    out["query_in_reference_clusters"] = float(np.isin(c_q, np.unique(c_ref)).mean())
    out["reference_clusters"] = int(np.unique(c_ref).size)
    out["ref_max_abs_diff"] = float(np.abs(qm.get_latent_representation(r) - z_ref).max())
    out.update(ref_train_s=t1 - t0, query_train_s=t2 - t1)
    return out


def run_scvi(ref, query, args, seed: int) -> dict:
    import scvi

    scvi.settings.seed = seed
    r, q = ref.copy(), query.copy()
    scvi.model.SCVI.setup_anndata(r, batch_key="batch")
    plan = {"lr": 1e-3, "n_epochs_kl_warmup": None, "weight_decay": 0.0, "eps": 1e-7}
    t0 = time.perf_counter()
    model = scvi.model.SCVI(r, encode_covariates=True, deeply_inject_covariates=False, **ARCH)
    model.train(max_epochs=args.ref_epochs, batch_size=128, early_stopping=False, enable_progress_bar=False,
                plan_kwargs=plan)
    t1 = time.perf_counter()
    z_ref = model.get_latent_representation()
    qm = scvi.model.SCVI.load_query_data(q, model)
    qm.train(max_epochs=args.query_epochs, batch_size=128, early_stopping=False, enable_progress_bar=False,
             plan_kwargs=plan)
    t2 = time.perf_counter()
    out = transfer_scores(z_ref, r.obs["cell_type"].astype(str).to_numpy(), qm.get_latent_representation(),
                          q.obs["cell_type"].astype(str).to_numpy())
    out["ref_max_abs_diff"] = float(np.abs(qm.get_latent_representation(r) - z_ref).max())
    out.update(ref_train_s=t1 - t0, query_train_s=t2 - t1)
    return out


def summarise(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float | int) and not isinstance(v, bool)]
    return {k: {"mean": statistics.mean(r[k] for r in runs),
                "sd": statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0} for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ref-epochs", type=int, default=100)
    parser.add_argument("--query-epochs", type=int, default=100)
    parser.add_argument("--prior-lr-ratio", type=float, default=2.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "query_mapping.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from pyro_vmm.data.scrna import load_shared, select_hvg

    adata = select_hvg(load_shared("kang_ifnb_2800"), n_top_genes=2000, batch_key="batch")
    batch = adata.obs["batch"].astype(str)
    ref, query = adata[batch == "CTRL"].copy(), adata[batch == "STIM"].copy()
    runs: dict[str, list[dict]] = {"VMM-scVI": [], "SCVI (scArches)": []}
    for seed in args.seeds:
        runs["VMM-scVI"].append(run_vmm(ref, query, args, seed))
        runs["SCVI (scArches)"].append(run_scvi(ref, query, args, seed))
        print(f"seed {seed}: " + "; ".join(f"{m} kNN acc {r[-1]['knn_acc']:.3f}" for m, r in runs.items()),
              flush=True)
    summary = {m: summarise(r) for m, r in runs.items()}

    print(f"\nkang_ifnb_2800: reference = {ref.n_obs} control cells, query = {query.n_obs} stimulated cells, "
          f"{adata.n_vars} genes; {args.ref_epochs} + {args.query_epochs} epochs; seeds {args.seeds}")
    head = f"{'model':<18} {'kNN acc':>15} {'kNN macro F1':>15} {'cluster acc':>15} {'ref diff':>9} {'query s':>8}"
    print(head + "\n" + "-" * len(head))
    for m, s in summary.items():
        def cell(k, s=s):
            return f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" if k in s else "–"

        print(f"{m:<18} {cell('knn_acc'):>15} {cell('knn_macro_f1'):>15} {cell('cluster_acc'):>15} "
              f"{s['ref_max_abs_diff']['mean']:>9.1e} {s['query_train_s']['mean']:>8.1f}")

    from pyro_vmm.utils import atomic_path, benchmark_header

    out = {
        **benchmark_header("query_mapping", sys.argv),
        "data": {"name": "kang_ifnb_2800", "reference": "CTRL", "query": "STIM", "n_reference": ref.n_obs,
                 "n_query": query.n_obs, "n_genes": adata.n_vars},
        "settings": vars(args),
        "runs": runs,
        "summary": summary,
    }

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
