"""The paper's Figure-5 tuning sweep for VMM-scVI: batch size x prior learning-rate ratio (PLR) per data set.

For every (batch size, PLR) in the grid and every seed, VMM-scVI is trained for the same number of epochs (the number
``scrna_benchmark.py --steps S`` gives at batch size 128, so every configuration sees the cells equally often) and
scored with scIB (unscaled, PCA as the unintegrated embedding) and against the labels.  Per batch size the PLRs run in
ascending order and stop once the mean number of utilized clusters falls below the number of cell types (larger PLRs
only prune more).  Among the configurations with at least as many utilized clusters as cell types the one with the
best mean scIB Total (Bio conservation for single-batch sets) is selected -- the paper's rule.  As in the paper the
selection reads the labels (through scIB); the benchmark then runs the selected setting with fresh seeds.

Run from the repository root, e.g.:
    python benchmarks/scrna_tuning.py --datasets kang_ifnb_2800 cellbench_3cl --steps 2000
Writes ``benchmarks/results/scrna_tuning.json`` (updated after every data set; the ``selected`` entry per data set is
what ``scrna_benchmark.py --vmm-config`` reads; it is null when no configuration reached the number of cell types)
and one Figure-5 plot per data set next to it (``<out stem>_<data set>.png``).  Sweeps run in parts (one process per
PLR, say) are combined, and selected again over all their runs, with
    python benchmarks/scrna_tuning.py --merge part1.json part2.json --out combined.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scrna_benchmark import DATASETS, RESULTS, epochs_for_steps, load_hvg  # noqa: E402

from pyro_vmm.utils import atomic_path  # noqa: E402

#: every configuration trains the epochs that give ``--steps`` steps at this batch size
BASE_BATCH_SIZE = 128


def sweep_dataset(name: str, args) -> dict:
    from pyro_vmm.evaluation import TuningGrid, tuning_sweep, vmm_scvi_trial

    hvg = load_hvg(name, args.data_dir, args.n_top_genes)
    n_labels = int(hvg.obs["cell_type"].nunique())
    multi_batch = hvg.obs["batch"].nunique() > 1
    epochs = epochs_for_steps(hvg.n_obs, args.steps, BASE_BATCH_SIZE)
    trial = vmm_scvi_trial(
        hvg,
        batch_key="batch" if multi_batch else None,
        labels_key="cell_type",
        model_kwargs=dict(prior="vmm", n_clusters=args.n_clusters, n_latent=10, n_hidden=128, n_layers=1,
                          gene_likelihood="zinb"),
        train_kwargs=dict(max_epochs=epochs, lr=args.lr, train_size=0.9, early_stopping=False,
                          check_val_every_n_epoch=10**9, enable_progress_bar=False),
    )

    def timed(batch_size: int, plr: float, seed: int) -> dict:
        t0 = time.perf_counter()
        out = trial(batch_size, plr, seed)
        out["wall_s"] = time.perf_counter() - t0
        print(f"  {name} B={batch_size:<4} PLR={plr:<5} seed {seed}: {out['utilized_clusters']:.0f} clusters, "
              f"NMI-u {out['nmi_unmerged']:.3f}, Total {out.get('Total', math.nan):.3f}, "
              f"Bio {out.get('Bio conservation', math.nan):.3f}, Batch {out.get('Batch correction', math.nan):.3f} "
              f"({out['wall_s']:.0f} s)", flush=True)
        return out

    grid = TuningGrid(batch_sizes=tuple(args.batch_sizes), prior_lr_ratios=tuple(args.prior_lr_ratios),
                      seeds=tuple(args.seeds))
    sweep = tuning_sweep(timed, n_labels=n_labels, grid=grid, progress=False)
    score = "Total" if multi_batch else "Bio conservation"
    return summarise_sweep(name, sweep, n_labels, epochs, score, Path(args.out))


def summarise_sweep(name: str, sweep, n_labels: int, epochs: int, score: str, out: Path) -> dict:
    """Select by the paper's rule, draw the Figure-5 plot next to ``out``, print the table; the JSON entry."""
    from pyro_vmm.evaluation import plot_tuning_sweep, select_tuning_config

    try:
        selected = select_tuning_config(sweep, score=score)
    except ValueError as err:  # nothing eligible: keep (and write) the runs, select nothing
        selected = None
        print(f"\n{name}: no selection -- {err}", flush=True)
    figure = out.with_name(f"{out.stem}_{name}.png")
    fig = plot_tuning_sweep(sweep, score=score)
    with atomic_path(figure) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    means = (sweep.groupby(["batch_size", "prior_lr_ratio"])
             [list(dict.fromkeys(["utilized_clusters", "nmi_unmerged", score, "wall_s"]))].mean().reset_index())
    print(f"\n{name}: {n_labels} cell types, {epochs} epochs per run, selected by mean {score}")
    print(means.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if selected is not None:
        print(f"selected: batch size {selected['batch_size']}, PLR {selected['prior_lr_ratio']}\n", flush=True)
    return {"n_labels": n_labels, "epochs": epochs, "score": score, "selected": selected,
            "figure": figure.name, "runs": json.loads(sweep.to_json(orient="records"))}


def merge(paths: list[str], out: Path, select_by: str | None = None) -> int:
    """Combine sweeps run in parts (e.g. one process per PLR) and select again over all their runs.

    Per data set the parts must share the training budget (epochs and steps); a repeated (batch size, PLR, seed)
    takes the later file's run; a part may itself be a merged file.  Eligibility and the selection are recomputed
    from the combined runs, by the sweep's own score or by ``select_by`` (any per-run column, e.g. ``nmi_unmerged``
    for the model's own clusters).
    """
    import pandas as pd

    from pyro_vmm.evaluation import mark_eligible

    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged: dict[str, dict] = {}
    for path, part in zip(paths, parts):
        for name, entry in part["datasets"].items():
            steps = entry["steps"] if "steps" in entry else entry["settings"]["steps"]  # a merged file has "steps"
            budget = (entry["epochs"], steps, entry["n_labels"], entry["score"])
            slot = merged.setdefault(name, {"budget": budget, "runs": {}, "commands": []})
            if slot["budget"] != budget:
                raise SystemExit(
                    f"cannot merge {path}: its {name} sweep has (epochs, steps, cell types, score) = {budget}, the "
                    f"earlier files {slot['budget']}; merge only sweeps run with the same --steps"
                )
            slot["commands"].extend(entry.get("commands") or [entry.get("command", part.get("command"))])
            for row in entry["runs"]:
                slot["runs"][(row["batch_size"], row["prior_lr_ratio"], row["seed"])] = row
    payload = {k: v for k, v in parts[0].items() if k not in ("datasets", "command")}
    payload.update(command=[p.get("command") for p in parts], merged_from=list(paths), datasets={})
    for name, slot in merged.items():
        epochs, steps, n_labels, score = slot["budget"]
        rows = sorted(slot["runs"].values(), key=lambda r: (r["batch_size"], r["prior_lr_ratio"], r["seed"]))
        sweep = mark_eligible(pd.DataFrame(rows), n_labels)
        entry = summarise_sweep(name, sweep, n_labels, epochs, select_by or score, out)
        entry.update(steps=steps, commands=slot["commands"])
        payload["datasets"][name] = entry
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["kang_ifnb_2800", "cellbench_3cl", "cellbench_5cl"],
                   choices=DATASETS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256, 512])
    p.add_argument("--prior-lr-ratios", nargs="+", type=float, default=[1.0, 2.5, 5.0, 10.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[100], help="tuning seeds (the benchmark uses 0 1 2)")
    p.add_argument("--steps", type=int, default=2000, help="epochs per run = these many steps at batch size 128")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-clusters", type=int, default=100)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=str(Path("..") / "shared" / "data" / "scrna"))
    p.add_argument("--out", default=str(RESULTS / "scrna_tuning.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="combine these sweep files (same --steps) into --out and select again; runs nothing")
    p.add_argument("--select-by", default=None, metavar="COLUMN",
                   help="with --merge: select by this per-run column (e.g. nmi_unmerged) instead of the sweep's "
                        "score (scIB Total, or Bio conservation for single-batch sets)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), select_by=args.select_by)
    if args.select_by:
        p.error("--select-by only applies with --merge (a sweep selects by its score)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for logger in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "scvi"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.exists() else {}
    payload.update({
        "benchmark": "scrna_tuning",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU only, {args.threads} torch thread(s), 2 cores shared with other jobs",
        "note": "The paper's scRNA-seq sets are not available offline; these are real substitutes.",
    })
    payload.setdefault("datasets", {})
    for name in args.datasets:
        t0 = time.perf_counter()
        result = sweep_dataset(name, args)
        result.update(settings={k: v for k, v in vars(args).items() if k not in ("datasets", "out")},
                      command=payload["command"], date=payload["date"], wall_s=time.perf_counter() - t0)
        payload["datasets"][name] = result
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
