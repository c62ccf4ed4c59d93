"""``pyro-vmm map`` end to end: a reference trained by ``pyro-vmm scrna`` on one batch, a query of the other."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pytest
from test_cli_scrna import _args, small_h5ad  # noqa: F401 -- the fixture is used by name

from pyro_vmm.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reference_and_query(small_h5ad, tmp_path_factory):  # noqa: F811
    """``pyro-vmm scrna`` on the b0 cells (reference folder) and a query file of the b1 cells with genes reversed."""
    root = tmp_path_factory.mktemp("map")
    adata = anndata.read_h5ad(small_h5ad)
    ref_file, query_file = root / "ref.h5ad", root / "query.h5ad"
    adata[adata.obs["batch"] == "b0"].copy().write_h5ad(ref_file)
    query = adata[adata.obs["batch"] == "b1"].copy()
    query[:, query.var_names[::-1]].copy().write_h5ad(query_file)
    assert main(_args(ref_file, root / "ref", "--no-markers", "--no-mde", "--max-epochs", "20")) == 0
    return root / "ref", query_file


def _map_args(ref, query, out, *extra):
    return ["map", "--reference", str(ref), "--data", str(query), "--out", str(out), "--labels-key", "cell_type",
            "--max-epochs", "20", "--batch-size", "64", "--no-progress", "--seed", "0", *extra]


def test_map_writes_query_latent_clusters_and_transferred_labels(reference_and_query, tmp_path):
    ref, query_file = reference_and_query
    out = tmp_path / "query"
    assert main(_map_args(ref, query_file, out)) == 0
    assert {p.name for p in out.iterdir()} == {"adata.h5ad", "metrics.json", "mde.png", "training.png", "model"}
    assert (out / "mde.png").read_bytes()[:8] == PNG_MAGIC

    query = anndata.read_h5ad(out / "adata.h5ad")
    reference = anndata.read_h5ad(ref / "adata.h5ad")
    assert query.n_obs == 150 and query.n_vars == 300  # all genes of the query file kept
    z, probs = query.obsm["X_vmm"], query.obsm["vmm_cluster_probs"]
    assert z.shape == (150, 4) and np.isfinite(z).all()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    # the query cells get the reference's final clusters: the argmax of q(c|z) over the reference's kept components,
    # mapped to the reference's clusters
    cluster_of = np.asarray(reference.uns["vmm_cluster_of_component"])
    np.testing.assert_array_equal(query.uns["vmm_cluster_of_component"], cluster_of)
    kept = np.flatnonzero(cluster_of >= 0)
    np.testing.assert_array_equal(query.obs["vmm_cluster"].astype(int).to_numpy(), cluster_of[kept[probs[:, kept].argmax(1)]])
    predicted = query.obs["predicted_cell_type"].astype(str).to_numpy()
    accuracy = (predicted == query.obs["cell_type"].astype(str).to_numpy()).mean()
    assert accuracy > 0.8
    conf = query.obs["predicted_cell_type_confidence"].to_numpy()
    assert ((conf > 0) & (conf <= 1)).all()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_transfer"]["accuracy"] == pytest.approx(accuracy)
    assert metrics["data"]["batches"] == ["b1"] and metrics["data"]["reference_batches"] == ["b0"]
    assert metrics["data"]["n_genes_used"] == 200
    assert metrics["share_in_reference_clusters"] > 0.9


def test_map_onto_a_reference_without_batch_key_says_how_to_fix(small_h5ad, tmp_path, capsys):  # noqa: F811
    ref = tmp_path / "ref"
    args = [a for a in _args(small_h5ad, ref, "--no-markers", "--no-mde") if a not in ("--batch-key", "batch")]
    assert main(args) == 0
    assert main(_map_args(ref, small_h5ad, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained without --batch-key" in err and "--batch-key COLUMN" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, root: a.__setitem__(a.index("--reference") + 1, str(root)), "has no model or adata.h5ad"),
        (lambda a, root: a.__setitem__(a.index("--labels-key") + 1, "celltype"), "not a column of the reference"),
        (lambda a, root: a.__setitem__(a.index("--data") + 1, str(root / "few_genes.h5ad")), "lacks 166 of the model's 200 genes"),
    ],
)
def test_map_bad_input_gives_one_clear_error_line(reference_and_query, tmp_path, capsys, change, message):
    ref, query_file = reference_and_query
    root = ref.parent
    if not (root / "few_genes.h5ad").exists():
        anndata.read_h5ad(query_file)[:, :50].copy().write_h5ad(root / "few_genes.h5ad")
    args = _map_args(ref, query_file, tmp_path / "out")
    change(args, root)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pyro-vmm map: error:") and message in err[-1], err[-1]
    assert not (tmp_path / "out").exists()


def test_map_embeds_cells_of_known_batches_with_the_frozen_reference(reference_and_query, tmp_path, capsys):
    """Query cells whose batch the reference was trained on are embedded as the reference embeds them (no training),
    and the command says so instead of asking for Python."""
    ref, _ = reference_and_query
    out = tmp_path / "known"
    args = _map_args(ref, ref.parent / "ref.h5ad", out)
    assert main(args) == 0
    said = capsys.readouterr().err
    assert "embedding the query cells with the reference model as it is (frozen, no training)" in said
    assert {p.name for p in out.iterdir()} == {"adata.h5ad", "metrics.json", "mde.png"}
    query, reference = anndata.read_h5ad(out / "adata.h5ad"), anndata.read_h5ad(ref / "adata.h5ad")
    np.testing.assert_allclose(query.obsm["X_vmm"], reference.obsm["X_vmm"], rtol=1e-5, atol=1e-5)  # the same cells
    np.testing.assert_array_equal(query.obs["vmm_cluster"].astype(str), reference.obs["vmm_cluster"].astype(str))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "embedded" and metrics["elbo"]["train_final"] is None
    assert metrics["data"]["batches"] == metrics["data"]["reference_batches"] == ["b0"]
