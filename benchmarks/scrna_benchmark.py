"""scRNA-seq integration + clustering benchmark (paper Tables 3 and 4, on the offline data sets).

Models, all on the same seurat_v3 HVGs (2000, batch-aware) with the same networks (1 hidden layer of 128, latent 10,
ZINB, gene dispersion, batch one-hot into encoder and decoder, no KL warm-up, batch size 128, lr 1e-3, 90/10 split):

- ``VMM-scVI`` / ``GMM-scVI`` / ``scVI N(0,I)``: ``pyro_vmm.VMMSCVI`` with prior vmm / gmm (MAP-DP, K = 100) / normal;
- ``SCVI``: ``scvi.model.SCVI(encode_covariates=True, deeply_inject_covariates=False)`` (scvi-tools 1.4.2);
- ``PCA``: 50 principal components of log-normalised counts (the unintegrated baseline).

Per data set and seed: scIB metrics (scib-metrics 0.5.10 Benchmarker, unscaled; batch metrics only for multi-batch
sets), the VMM/GMM clusters scored against the labels (utilized clusters, most-probable-member accuracy, NMI
merged/unmerged, ARI), Leiden (resolution 1, igraph) NMI on every learned latent, and per-epoch training time (wall and
CPU) of every model from the same run.  Tables report mean +- sd over seeds.

The paper's own data sets (full cortex, scVI PBMC 4k+8k, lung atlas, SPLiT-seq) are not available offline; these are
real substitutes (see ../shared/data/README.md).  Every run trains for a fixed budget of ``--steps`` minibatch steps
(default 600: 30 epochs on kang_ifnb_2800, 150 on cellbench_3cl; ``--max-epochs`` overrides; early stopping with
``--patience``), far less than the paper's up-to-10000 epochs with patience 100, to fit a shared 2-core CPU.  All
learned models use the prior learning-rate ratio chosen on kang_ifnb_2800 (``--prior-lr-ratio 2.5``), as the paper
used the VMM's tuned setting for every test case.

Run from the repository root:
    python benchmarks/scrna_benchmark.py                      # all five sets, seeds 0 1 2
    python benchmarks/scrna_benchmark.py --quick              # smoke run: cellbench_3cl, 1 seed, 3 epochs
Writes benchmarks/results/scrna_benchmark.json (rewritten after every data set x seed, so partial runs are kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path("benchmarks") / "results"
DATASETS = ("kang_ifnb_2800", "cellbench_3cl", "cellbench_5cl", "zeisel_cortex_subset", "sorted_pbmc")
MODELS = ("VMM-scVI", "GMM-scVI", "scVI N(0,I)", "SCVI", "PCA")
PRIORS = {"VMM-scVI": "vmm", "GMM-scVI": "gmm", "scVI N(0,I)": "normal"}
OBSM = {"VMM-scVI": "X_vmm", "GMM-scVI": "X_gmm", "scVI N(0,I)": "X_normal", "SCVI": "X_scvi", "PCA": "X_pca"}
#: data sets and checks of the acceptance targets
TARGET_TOTAL_SETS = ("kang_ifnb_2800", "cellbench_3cl", "cellbench_5cl")
COLUMNS = [
    ("Batch correction", "Batch", 3),
    ("Bio conservation", "Bio", 3),
    ("Total", "Total", 3),
    ("utilized_clusters", "Clusters", 1),
    ("accuracy", "ACC", 3),
    ("nmi_merged", "NMI-m", 3),
    ("nmi_unmerged", "NMI-u", 3),
    ("ari_unmerged", "ARI-u", 3),
    ("leiden_nmi", "Leiden NMI", 3),
    ("cluster_batch_mixing", "Mix", 3),
    ("leiden_batch_mixing", "Leiden mix", 3),
    ("s_per_epoch", "s/epoch", 2),
    ("cpu_s_per_epoch", "CPU s/ep", 2),
]


def epoch_timer():
    from pyro_vmm.callbacks import EpochTimer

    return EpochTimer()


def epochs_for_steps(n_cells: int, steps: int, batch_size: int) -> int:
    """Epochs that give ``steps`` minibatch steps at ``batch_size`` on the 90 % training split."""
    return max(1, math.ceil(steps / math.ceil(round(0.9 * n_cells) / batch_size)))


def epochs_for(n_cells: int, args) -> int:
    """``--max-epochs`` if given, else enough epochs for ``--steps`` minibatch steps on 90% of the cells."""
    if args.max_epochs is not None:
        return args.max_epochs
    return epochs_for_steps(n_cells, args.steps, args.batch_size)


def _trainer_kwargs(args, n_cells: int) -> dict[str, Any]:
    validate = args.patience > 0
    return {
        "max_epochs": epochs_for(n_cells, args),
        "batch_size": args.batch_size,
        "train_size": 0.9,
        "early_stopping": validate,
        "early_stopping_patience": max(args.patience, 1),
        "check_val_every_n_epoch": 1 if validate else 10**9,
        "enable_progress_bar": False,
    }


def _timing(timer, t_train: float) -> dict[str, float]:
    skip = 1 if len(timer.wall) > 2 else 0  # the first epoch carries one-off set-up costs
    return {
        "epochs": len(timer.wall),
        "train_s": t_train,
        "s_per_epoch": statistics.median(timer.wall[skip:]),
        "cpu_s_per_epoch": statistics.median(timer.cpu[skip:]),
    }


def train_setting(prior: str, dataset: str, args) -> dict[str, float]:
    """Batch size and PLR of our model with ``prior`` on ``dataset``: for the VMM the tuning sweep's selection
    (``--vmm-config``) where it lists the data set, otherwise ``--batch-size`` / ``--prior-lr-ratio``."""
    setting = {"batch_size": args.batch_size, "prior_lr_ratio": args.prior_lr_ratio}
    if prior == "vmm" and args.vmm_config:
        tuned = json.loads(Path(args.vmm_config).read_text()).get("datasets", {}).get(dataset)
        if tuned is not None and tuned.get("selected") is None:
            raise SystemExit(f"{args.vmm_config} has no selected setting for {dataset} (no configuration of its sweep "
                             "reached the number of cell types); widen the sweep or drop --vmm-config")
        if tuned is not None:
            setting = {k: tuned["selected"][k] for k in setting}
    return setting


def train_ours(adata, prior: str, seed: int, args, dataset: str = "") -> dict[str, Any]:
    """Our model with ``prior``; VMM-scVI with its tuned batch size / PLR (same number of epochs as the others)."""
    from pyro_vmm import VMMSCVI

    data = adata.copy()
    VMMSCVI.setup_anndata(data, batch_key="batch")
    model = VMMSCVI(data, prior=prior, n_clusters=args.n_clusters, n_latent=10, n_hidden=128, n_layers=1,
                    gene_likelihood="zinb", seed=seed, **args.model_kwargs)
    timer = epoch_timer()
    t0 = time.perf_counter()
    setting = train_setting(prior, dataset, args)
    kwargs = {**_trainer_kwargs(args, data.n_obs), "batch_size": int(setting["batch_size"])}
    model.train(lr=args.lr, prior_lr_ratio=float(setting["prior_lr_ratio"]), seed=seed, callbacks=[timer], **kwargs)
    out = _timing(timer, time.perf_counter() - t0)
    out.update(setting)
    out["latent"] = model.get_latent_representation()
    out["probs"] = model.get_cluster_probabilities() if prior != "normal" else None
    out["elbo_train"] = float(model.history["elbo_train"].iloc[-1, 0])
    return out


def train_scvi(adata, seed: int, args) -> dict[str, Any]:
    import scvi

    scvi.settings.seed = seed
    data = adata.copy()
    scvi.model.SCVI.setup_anndata(data, batch_key="batch")
    model = scvi.model.SCVI(data, n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="zinb",
                            encode_covariates=True, deeply_inject_covariates=False)
    timer = epoch_timer()
    t0 = time.perf_counter()
    model.train(
        plan_kwargs={"lr": args.lr, "weight_decay": 0.0, "eps": 1e-7, "n_epochs_kl_warmup": None,
                     "n_steps_kl_warmup": None},
        callbacks=[timer],
        **_trainer_kwargs(args, data.n_obs),
    )
    out = _timing(timer, time.perf_counter() - t0)
    out["latent"] = model.get_latent_representation()
    out["probs"] = None
    out["elbo_train"] = float(model.history["elbo_train"].iloc[-1, 0])
    return out


def load_hvg(name: str, data_dir: str, n_top_genes: int):
    """The data set's counts on its seurat_v3 HVGs (batch-aware for multi-batch sets), cells without counts dropped."""
    from pyro_vmm.data.scrna import load_shared, select_hvg

    adata = load_shared(name, data_dir)
    n_batches = adata.obs["batch"].nunique()
    hvg = select_hvg(adata, n_top_genes=n_top_genes, batch_key="batch" if n_batches > 1 else None)
    return hvg[np.asarray(hvg.X.sum(axis=1)).ravel() > 0].copy()


def run_one(name: str, seed: int, args) -> list[dict[str, Any]]:
    """All models on one data set and seed; returns one result row per model."""
    from pyro_vmm.evaluation import ScibConfig, clustering_scores, leiden_baseline, pca_embedding, scib_table
    from pyro_vmm.metrics import cluster_batch_mixing
    from pyro_vmm.utils import set_seed

    hvg = load_hvg(name, args.data_dir, args.n_top_genes)
    n_batches = hvg.obs["batch"].nunique()
    labels = hvg.obs["cell_type"].astype(str).to_numpy()
    batches = hvg.obs["batch"].astype(str).to_numpy()
    base = {"dataset": name, "seed": seed, "n_cells": hvg.n_obs, "n_genes": hvg.n_vars, "n_batches": int(n_batches),
            "n_labels": int(np.unique(labels).size), "max_epochs": epochs_for(hvg.n_obs, args)}
    rows = []
    for model in args.models:
        set_seed(seed)
        t0 = time.perf_counter()
        if model == "PCA":
            res = {"latent": pca_embedding(hvg, n_comps=50, seed=seed), "probs": None}
        elif model == "SCVI":
            res = train_scvi(hvg, seed, args)
        else:
            res = train_ours(hvg, PRIORS[model], seed, args, dataset=name)
        hvg.obsm[OBSM[model]] = res.pop("latent")
        probs = res.pop("probs")
        row = {**base, "model": model, **res}
        if probs is not None:
            row.update(clustering_scores(probs, labels).to_dict())
            if n_batches > 1:  # are the model's own clusters split by batch?
                row["cluster_batch_mixing"] = cluster_batch_mixing(probs.argmax(1), batches)
        if model != "PCA":
            leiden = leiden_baseline(hvg.obsm[OBSM[model]], labels, resolution=1.0, seed=seed)
            row.update({"leiden_nmi": leiden.nmi, "leiden_ari": leiden.ari, "leiden_clusters": leiden.n_clusters})
            if n_batches > 1:
                row["leiden_batch_mixing"] = cluster_batch_mixing(leiden.clusters, batches)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {name} seed {seed} {model:<12} {row['wall_s']:7.1f} s  "
              + "  ".join(f"{k}={row[k]:.3g}" for k in ("utilized_clusters", "nmi_unmerged", "leiden_nmi",
                                                        "s_per_epoch") if k in row and row[k] is not None),
              flush=True)
    if not args.no_scib:
        t0 = time.perf_counter()
        hvg.obsm["X_pre"] = hvg.obsm.get("X_pca", None) if "PCA" in args.models else pca_embedding(hvg, 50, seed=seed)
        table = scib_table(hvg, "batch", "cell_type", [OBSM[m] for m in args.models],
                           config=ScibConfig(pre_integrated_key="X_pre", n_jobs=args.threads))
        for row in rows:
            row.update({k: float(v) for k, v in table.loc[OBSM[row["model"]]].items()})
        print(f"  {name} seed {seed} scIB {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """dataset -> model -> metric -> {mean, sd, n} over seeds."""
    out: dict = {}
    keys = [c for c, _, _ in COLUMNS] + ["ari_merged", "leiden_clusters", "epochs"]
    for row in rows:
        out.setdefault(row["dataset"], {}).setdefault(row["model"], {}).setdefault("_rows", []).append(row)
    for models in out.values():
        for model, entry in models.items():
            runs = entry.pop("_rows")
            for key in keys:
                vals = [float(r[key]) for r in runs if r.get(key) is not None and not math.isnan(float(r[key]))]
                if vals:
                    entry[key] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                  "n": len(vals)}
    return out


def checks(summary, rows) -> list[dict[str, Any]]:
    """The acceptance targets, each with its numbers and whether it holds."""
    def m(ds, model, key):
        return summary.get(ds, {}).get(model, {}).get(key, {}).get("mean")

    out = []
    for ds in TARGET_TOTAL_SETS:
        if m(ds, "VMM-scVI", "Total") is None or m(ds, "SCVI", "Total") is None:
            continue
        out.append({"check": f"{ds}: VMM-scVI scIB Total >= SCVI's and Bio conservation > SCVI's (mean over seeds)",
                    "vmm_total": m(ds, "VMM-scVI", "Total"), "scvi_total": m(ds, "SCVI", "Total"),
                    "vmm_bio": m(ds, "VMM-scVI", "Bio conservation"), "scvi_bio": m(ds, "SCVI", "Bio conservation"),
                    "holds": m(ds, "VMM-scVI", "Total") >= m(ds, "SCVI", "Total")
                    and m(ds, "VMM-scVI", "Bio conservation") > m(ds, "SCVI", "Bio conservation")})
    ds = "kang_ifnb_2800"
    if m(ds, "VMM-scVI", "nmi_unmerged") is not None and m(ds, "SCVI", "leiden_nmi") is not None:
        n_labels = next(r["n_labels"] for r in rows if r["dataset"] == ds)
        used = m(ds, "VMM-scVI", "utilized_clusters")
        out.append({"check": f"{ds}: VMM-scVI cluster NMI (unmerged) >= Leiden(res 1) NMI on the SCVI latent, with "
                             f"{n_labels}..{3 * n_labels} utilized clusters",
                    "vmm_nmi_unmerged": m(ds, "VMM-scVI", "nmi_unmerged"), "leiden_nmi_scvi": m(ds, "SCVI", "leiden_nmi"),
                    "utilized_clusters": used,
                    "holds": m(ds, "VMM-scVI", "nmi_unmerged") >= m(ds, "SCVI", "leiden_nmi")
                    and n_labels <= used <= 3 * n_labels})
    for ds in summary:
        if m(ds, "VMM-scVI", "s_per_epoch") is None or m(ds, "SCVI", "s_per_epoch") is None:
            continue
        # times compare only within one process: rows merged from different files ran at different loads
        sources = {r.get("source") for r in rows if r["dataset"] == ds and r["model"] in ("VMM-scVI", "SCVI")}
        same_run = len(sources) == 1
        out.append({"check": f"{ds}: VMM-scVI per-epoch time <= SCVI's (median over epochs, mean over seeds)"
                             + ("" if same_run else " -- not comparable: the two models ran in different processes"),
                    "vmm_s_per_epoch": m(ds, "VMM-scVI", "s_per_epoch"), "scvi_s_per_epoch": m(ds, "SCVI", "s_per_epoch"),
                    "vmm_cpu_s_per_epoch": m(ds, "VMM-scVI", "cpu_s_per_epoch"),
                    "scvi_cpu_s_per_epoch": m(ds, "SCVI", "cpu_s_per_epoch"),
                    "holds": (m(ds, "VMM-scVI", "s_per_epoch") <= m(ds, "SCVI", "s_per_epoch")) if same_run else None})
    return out


def format_table(summary) -> str:
    lines = []
    head = f"{'data set':<21} {'model':<12} " + " ".join(f"{label:>13}" for _, label, _ in COLUMNS)
    lines += [head, "-" * len(head)]
    for ds, models in summary.items():
        for model in MODELS:
            if model not in models:
                continue
            cells = []
            for key, _, digits in COLUMNS:
                v = models[model].get(key)
                cells.append(f"{v['mean']:.{digits}f}±{v['sd']:.{digits}f}" if v else "-")
            lines.append(f"{ds:<21} {model:<12} " + " ".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def write(path: Path, payload: dict) -> None:
    from pyro_vmm.outputs import json_safe
    from pyro_vmm.utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")


def report(summary, rows, note: str) -> None:
    print("\n" + format_table(summary))
    settings = {(r["dataset"], r["batch_size"], r["prior_lr_ratio"]) for r in rows if r["model"] == "VMM-scVI"
                and "batch_size" in r}
    for ds, bs, plr in sorted(settings):
        print(f"VMM-scVI on {ds}: batch size {bs}, prior LR ratio {plr}")
    print("\nAcceptance checks:")
    for c in checks(summary, rows):
        nums = ", ".join(f"{k}={v:.3f}" for k, v in c.items() if isinstance(v, float))
        verdict = "n/a" if c["holds"] is None else "holds" if c["holds"] else "FAILS"
        print(f"  [{verdict}] {c['check']}: {nums}")
    print(f"\n{note}")


def merge(paths: list[str], out: Path) -> int:
    """Combine the ``runs`` of several result files (later files win for a repeated data set x seed x model).

    Each run keeps the file it came from (``source``); the per-epoch time check is left undecided (``holds: null``)
    when VMM-scVI and SCVI come from different files, as their times were taken at different loads."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    runs: dict[tuple, dict] = {}
    for path, part in zip(paths, parts):
        for row in part["runs"]:
            runs[(row["dataset"], row["seed"], row["model"])] = {**row, "source": row.get("source", str(path))}
    order = {ds: i for i, ds in enumerate(DATASETS)}
    rows = sorted(runs.values(), key=lambda r: (order.get(r["dataset"], 99), r["seed"], MODELS.index(r["model"])))
    summary = summarise(rows)
    meta = {k: v for k, v in parts[0].items() if k not in ("runs", "summary", "checks", "wall_s", "command")}
    meta["command"] = [p["command"] for p in parts]
    meta["merged_from"] = list(paths)
    meta["wall_s"] = sum(p.get("wall_s", 0.0) for p in parts)
    write(out, {**meta, "summary": summary, "checks": checks(summary, rows), "runs": rows})
    report(summary, rows, meta["note"])
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS + ("paul15",))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--steps", type=int, default=600,
                   help="training budget in minibatch steps per run: epochs = steps / steps-per-epoch (so small "
                        "sets get more epochs); overridden by --max-epochs")
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--patience", type=int, default=0, help="early stopping on the validation ELBO (0: off)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prior-lr-ratio", type=float, default=2.5,
                   help="EM learning rate / VI learning rate; 2.5 was chosen on kang_ifnb_2800 (see docs/results/scrna.md)")
    p.add_argument("--vmm-config", default=None, metavar="JSON",
                   help="scrna_tuning.py's result: VMM-scVI uses the batch size and PLR selected there for each data "
                        "set it lists (same number of epochs as the other models)")
    p.add_argument("--n-clusters", type=int, default=100)
    p.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                   help="extra VMMSCVI arguments for our models, e.g. the reference code's forms: "
                        "'{\"var_activation\": \"softplus\", \"pseudo_input_shift\": 1}'")
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-scib", action="store_true")
    p.add_argument("--data-dir", default=str(Path("..") / "shared" / "data" / "scrna"))
    p.add_argument("--out", default=str(RESULTS / "scrna_benchmark.json"))
    p.add_argument("--quick", action="store_true", help="cellbench_3cl, seed 0, 3 epochs (a smoke run)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="train nothing: combine the runs of earlier result files (e.g. data sets run in parallel "
                        "processes) into --out and print the table")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.quick:
        args.datasets, args.seeds, args.max_epochs = ["cellbench_3cl"], [0], 3
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)

    meta = {
        "benchmark": "scrna_benchmark",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU only, {args.threads} torch threads, 2 cores shared with other jobs",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items()},
        "note": "The paper's scRNA-seq sets (cortex, PBMC 4k+8k, lung atlas, SPLiT-seq) are not available offline; "
                "these are real substitutes. A fixed budget of --steps minibatch steps per run (no early stopping unless "
                "--patience), far below the "
                "paper's up-to-10000 epochs with patience 100.",
    }
    try:
        import scib_metrics
        import scvi

        meta["versions"].update({"scvi-tools": scvi.__version__, "scib-metrics": scib_metrics.__version__})
    except ImportError:
        pass
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name in args.datasets:
        for seed in args.seeds:
            print(f"[{time.perf_counter() - t0:7.0f} s] {name} seed {seed}", flush=True)
            rows.extend(run_one(name, seed, args))
            summary = summarise(rows)
            write(Path(args.out), {**meta, "wall_s": time.perf_counter() - t0, "summary": summary,
                                   "checks": checks(summary, rows), "runs": rows})
    summary = summarise(rows)
    report(summary, rows, meta["note"])
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
