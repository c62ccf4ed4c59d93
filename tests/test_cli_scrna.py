"""``pyro-vmm scrna`` end to end on a small file, and its one-line errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from pyro_vmm.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory):
    """300 cells x 300 genes of negative-binomial counts: 3 cell types, 2 batches with a batch effect."""
    rng = np.random.default_rng(0)
    n, g = 300, 300
    y = np.repeat(np.arange(3), n // 3)
    batch = np.tile([0, 1], n // 2)
    profile = rng.gamma(0.5, 1.0, size=(3, g)) * rng.gamma(2.0, 1.0, size=(2, g))[:, None].mean(0)
    mean = profile[y] * rng.gamma(2.0, 0.5, size=(2, g))[batch] * 3
    counts = rng.negative_binomial(5, 5 / (5 + mean)).astype(np.int32)
    counts[:, :5] += 1  # no empty cell
    obs = pd.DataFrame(
        {"batch": pd.Categorical(np.array(["b0", "b1"])[batch]), "cell_type": pd.Categorical(np.array(list("ABC"))[y])},
        index=[f"cell{i}" for i in range(n)],
    )
    adata = anndata.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    path = tmp_path_factory.mktemp("data") / "small.h5ad"
    adata.write_h5ad(path)
    return path


def _args(data, out, *extra):
    return [
        "scrna", "--data", str(data), "--out", str(out), "--batch-key", "batch", "--labels-key", "cell_type",
        "--n-top-genes", "200", "--n-clusters", "8", "--n-latent", "4", "--max-epochs", "2", "--batch-size", "64",
        "--no-progress", "--no-scib", "--seed", "0", *extra,
    ]


def test_scrna_writes_every_output_well_formed(small_h5ad, tmp_path):
    out = tmp_path / "run"
    assert main(_args(small_h5ad, out)) == 0
    markers = pd.read_csv(out / "markers.csv")
    written = {"adata.h5ad", "clusters.png", "mde.png", "metrics.json", "markers.csv", "training.png", "model"}
    assert {p.name for p in out.iterdir()} == written | ({"markers.png"} if len(markers) else set())

    adata = anndata.read_h5ad(out / "adata.h5ad")
    assert adata.shape == (300, 200) and adata.var["highly_variable"].all()  # the model's genes ...
    assert adata.raw.shape == (300, 300) and adata.raw.var["highly_variable"].sum() == 200  # ... all genes in raw
    np.testing.assert_array_equal(adata.raw.X.toarray(), anndata.read_h5ad(small_h5ad).X.toarray())
    z = adata.obsm["X_vmm"]
    probs = adata.obsm["vmm_cluster_probs"]
    assert z.shape == (300, 4) and np.isfinite(z).all()
    assert probs.shape == (300, 8)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # the final clusters: the argmax of q(c|z) over the components kept (near-empty ones folded in), mapped to the
    # cluster of that component (components of one blob merged); the map is stored beside the probabilities
    assign = adata.obs["vmm_cluster"].astype(int).to_numpy()
    cluster_of = np.asarray(adata.uns["vmm_cluster_of_component"])
    kept = np.flatnonzero(cluster_of >= 0)
    np.testing.assert_array_equal(assign, cluster_of[kept[probs[:, kept].argmax(1)]])
    assert adata.obsm["X_vmm_mde"].shape == (300, 2)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["prior"] == "vmm" and metrics["settings"]["seed"] == 0
    assert metrics["data"] == {
        "path": str(small_h5ad), "n_cells": 300, "n_genes": 300, "n_genes_used": 200, "n_cells_left_out_empty": 0,
        "n_batches": 2, "n_labels": 3,
    }
    assert metrics["utilized_clusters"] == len(np.unique(assign)) == metrics["clustering"]["utilized_clusters"]
    assert sum(metrics["cluster_sizes"].values()) == 300
    from pyro_vmm.metrics import cluster_batch_mixing

    batch = adata.obs["batch"].astype(str).to_numpy()
    assert metrics["cluster_batch_mixing"] == pytest.approx(cluster_batch_mixing(assign, batch))
    assert 0.0 <= metrics["clustering"]["nmi_unmerged"] <= 1.0
    assert metrics["epochs_trained"] == 2
    assert all(np.isfinite(metrics["elbo"][k]) and metrics["elbo"][k] > 0 for k in ("train_final", "validation_final"))
    assert metrics["runtime_s"]["total"] >= metrics["runtime_s"]["train"] > 0
    assert metrics["scib"] is None
    assert list(markers.columns[:5]) == ["cluster", "cluster_number", "n_cells", "rank", "gene"]
    assert metrics["markers"]["clusters_with_markers"] == markers["cluster"].nunique()
    sizes = pd.Series(assign).value_counts()
    assert set(metrics["markers"]["skipped_clusters_under_10_cells"]) == set(sizes.index[sizes < 10])
    assert (out / "mde.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "clusters.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "training.png").read_bytes()[:8] == PNG_MAGIC
    # outputs get the permissions of any file the user writes (not the temporary file's owner-only 0o600)
    (tmp_path / "plain").write_text("x")
    plain_mode = (tmp_path / "plain").stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()} == {
        p.name: plain_mode for p in out.iterdir() if p.is_file()
    }

    # the saved model reloads with the written AnnData as it is, and gives the same latent
    from pyro_vmm import VMMSCVI

    model = VMMSCVI.load(str(out / "model"), adata=anndata.read_h5ad(out / "adata.h5ad"))
    np.testing.assert_allclose(model.get_latent_representation(), z, rtol=1e-4, atol=1e-4)

    # an existing output folder is not overwritten silently
    assert main(_args(small_h5ad, out)) == 2
    # with --overwrite, outputs this run does not write are not left behind from the earlier one
    assert main(_args(small_h5ad, out, "--overwrite", "--no-mde", "--no-markers")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adata.h5ad", "clusters.png", "metrics.json", "model",
                                                     "training.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["no_mde"] is True and metrics["markers"] is None


def test_scrna_failure_leaves_no_partial_output(small_h5ad, tmp_path, monkeypatch):
    import pyro_vmm.plotting

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(pyro_vmm.plotting, "mde_figure", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="figure failed"):
        main(_args(small_h5ad, out))
    assert list(out.iterdir()) == []  # not the model, not the AnnData, no staging folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, d: a.__setitem__(2, str(d / "missing.h5ad")), "does not exist"),
        (lambda a, d: a.__setitem__(a.index("batch"), "donor"), "--batch-key='donor' is not a column"),
        (lambda a, d: a.__setitem__(a.index("cell_type"), "celltype"), "--labels-key='celltype' is not a column"),
        (lambda a, d: a.extend(["--layer", "counts"]), "layer 'counts' not found"),
        (lambda a, d: a.extend(["--lr", "-1"]), "--lr must be a positive number"),
        (lambda a, d: a.extend(["--merge-at", "0.5", "1.5"]), "--merge-at takes fractions of the run in (0, 1]"),
    ],
)
def test_scrna_bad_input_gives_one_clear_error_line(small_h5ad, tmp_path, capsys, change, message):
    args = _args(small_h5ad, tmp_path / "run")
    change(args, tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyro-vmm scrna: error:") and message in err[0]
    assert not (tmp_path / "run").exists()


def test_scrna_help_states_the_default_epochs():
    out = subprocess.run(
        [sys.executable, "-m", "pyro_vmm", "scrna", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(out.split())  # argparse wraps the help text
    assert "--max-epochs" in flat and "400 up to 20,000 cells" in flat and "defaults.py" in flat and "--no-scib" in flat
    assert "--merge-at" in flat and "[0.5, 0.75]" in flat  # the API's merge moves, DEFAULTS.merge_at


def test_scrna_run_is_quiet_and_the_bar_shows_loss_and_clusters(shared_data, tmp_path):
    """No Lightning tip, no known-harmless deprecation or ``log_every_n_steps`` warning on the terminal; the
    progress bar shows the training loss and the utilized clusters (not ``v_num``)."""
    import os

    from _data import kang_subset

    data = tmp_path / "kang_small.h5ad"
    kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad", n_cells=300, n_genes=300).write_h5ad(data)
    # 25 epochs: the validation ELBO every 2nd epoch, the clusters on the bar every epoch (from the training cells)
    args = [a for a in _args(data, tmp_path / "run", "--no-markers", "--no-mde", "--max-epochs", "25")
            if a != "--no-progress"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # show every warning once, as a plain run would
    done = subprocess.run([sys.executable, "-m", "pyro_vmm", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    noisy = [line for line in done.stderr.replace("\r", "\n").splitlines()
             if any(word in line for word in ("Tip:", "deprecated", "log_every_n_steps"))]
    assert noisy == []
    terminal = (done.stdout + done.stderr).replace("\r", "\n")
    assert "train_loss=" in terminal and "clusters=" in terminal and "v_num" not in terminal
    assert re.search(r"Epoch 2/25[^\n]*train_loss=[^\n]*clusters=", terminal)  # after the first epoch already


@pytest.mark.parametrize("command", ["scrna", "map", "images", "images-sweep"])
def test_help_states_each_default_once_and_only_where_it_says_something(command):
    """No default printed twice, no '(default: None)', required options without a default, defaults shown on every
    option that has one (the images commands too), and every option explained."""
    import argparse
    import re

    from pyro_vmm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    text = sub.format_help()
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])  # one entry per option
    by_option = {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries if e.strip().startswith("--")}
    assert "(default: None)" not in text
    for action in sub._actions:
        if not action.option_strings or action.option_strings[0] in ("-h", "--help"):
            continue
        entry = by_option[action.option_strings[0]]
        help_text = entry.split(" ", 1)[1] if " " in entry else ""
        assert action.help and len(action.help) > 3, f"{action.option_strings[0]} has no help text"
        assert len(re.findall(r"\(default\b", entry)) <= 1, f"default twice: {entry}"
        if action.required:
            assert "default" not in help_text, entry
        elif action.default is not None and action.nargs != 0:
            assert "default" in help_text, f"no default shown: {entry}"
    assert "random seed" in by_option["--seed"]


def test_scrna_batch_column_with_a_missing_value_gives_one_clear_error(small_h5ad, tmp_path, capsys):
    adata = anndata.read_h5ad(small_h5ad)
    batch = adata.obs["batch"].astype(str).astype(object)
    batch.iloc[7] = np.nan
    adata.obs["batch"] = batch
    path = tmp_path / "nan_batch.h5ad"
    adata.write_h5ad(path)
    assert main(_args(path, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-key" in err[0] and "1 missing (NaN) value" in err[0] and "fillna" in err[0]
    assert not (tmp_path / "run").exists()
