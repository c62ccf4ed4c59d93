"""Evaluation (Leiden baseline, PCA baseline, scIB table, tuning sweep) and plotting (MDE figure, sweep plot)."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from pyro_vmm.evaluation import (
    ScibConfig,
    TuningGrid,
    knn_label_transfer,
    label_transfer_scores,
    leiden_baseline,
    mark_eligible,
    pca_embedding,
    scib_table,
    select_tuning_config,
    tuning_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _blobs(n_per=150, k=3, d=8, sep=6.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * sep
    y = np.repeat(np.arange(k), n_per)
    return (centers[y] + rng.normal(size=(len(y), d))).astype(np.float32), y


def test_leiden_baseline_recovers_separated_groups_and_not_shuffled_labels():
    x, y = _blobs()
    res = leiden_baseline(x, y, resolution=1.0, seed=0)
    assert res.nmi > 0.8 and res.n_clusters >= 3
    again = leiden_baseline(x, y, resolution=1.0, seed=0)
    np.testing.assert_array_equal(res.clusters, again.clusters)  # seeded
    shuffled = leiden_baseline(x, np.random.default_rng(1).permutation(y), seed=0)
    assert shuffled.nmi < 0.05
    coarse = leiden_baseline(x, y, resolution=0.1, seed=0)
    assert coarse.n_clusters <= res.n_clusters  # lower resolution, fewer communities
    with pytest.raises(ValueError, match="one entry per cell"):
        leiden_baseline(x, y[:-1])


def test_pca_embedding_matches_svd_of_log_normalised_counts():
    rng = np.random.default_rng(0)
    rates = rng.gamma(1.0, 1.0, size=(3, 60))
    groups = np.repeat(np.arange(3), 40)
    counts = rng.poisson(rates[groups] * rng.uniform(0.5, 2.0, size=(120, 1)) * 5).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    adata = anndata.AnnData(X=sparse.csr_matrix(counts))
    emb = pca_embedding(adata, n_comps=5)
    ln = np.log1p(1e4 * counts / counts.sum(1, keepdims=True))
    u, s, _ = np.linalg.svd(ln - ln.mean(0), full_matrices=False)
    ref = u[:, :5] * s[:5]
    np.testing.assert_allclose(np.abs(emb), np.abs(ref), rtol=1e-3, atol=1e-3)  # components are defined up to sign
    assert sparse.issparse(adata.X) and np.allclose(adata.X.toarray(), counts)  # input untouched


def test_scib_table_orders_integrated_above_shuffled(shared_data, tmp_path):
    from pyro_vmm.data.scrna import load_shared

    adata = load_shared("cellbench_3cl", shared_data / "scrna")  # 499 cells, 2 technologies, 3 cell lines
    rng = np.random.default_rng(0)
    y = adata.obs["cell_type"].cat.codes.to_numpy()
    integrated = np.eye(3)[y] * 4 + rng.normal(size=(adata.n_obs, 3))  # cell line only, no batch signal
    adata.obsm["integrated"] = np.hstack([integrated, rng.normal(size=(adata.n_obs, 3))]).astype(np.float32)
    adata.obsm["shuffled"] = adata.obsm["integrated"][rng.permutation(adata.n_obs)]
    # kBET, isolated labels and PCR are skipped only to keep the test fast (their jax compilation takes minutes on a
    # loaded 2-core CPU); the remaining metrics still cover both aggregates
    config = ScibConfig(exclude=("kbet_per_label", "isolated_labels", "pcr_comparison"))
    log = tmp_path / "scib.log"
    table = scib_table(adata, "batch", "cell_type", ["integrated", "shuffled"], config=config, log_file=log)
    assert log.is_file()
    assert list(table.index) == ["integrated", "shuffled"]
    assert {"Batch correction", "Bio conservation", "Total", "KMeans NMI", "iLISI", "cLISI"} <= set(table.columns)
    assert not {"KBET", "Isolated labels", "PCR comparison"} & set(table.columns)
    good, bad = table.loc["integrated"], table.loc["shuffled"]
    assert good["Bio conservation"] > bad["Bio conservation"] + 0.3
    assert good["Total"] > bad["Total"]
    assert good["KMeans NMI"] > 0.9 and bad["KMeans NMI"] < 0.1
    np.testing.assert_allclose(table["Total"], 0.4 * table["Batch correction"] + 0.6 * table["Bio conservation"])
    assert "X_pca" not in adata.obsm and "integrated" in adata.obsm  # input untouched
    with pytest.raises(KeyError, match="not in adata.obsm"):
        scib_table(adata, "batch", "cell_type", ["missing"])
    with pytest.raises(ValueError, match="unknown metric"):
        scib_table(adata, "batch", "cell_type", ["integrated"], config=ScibConfig(exclude=("kbet",)))


def test_log_to_file_moves_a_library_logger_off_the_terminal_and_back(tmp_path):
    """scIB's per-label INFO lines go to a file in ``pyro-vmm scrna``; the logger is as before afterwards."""
    import io
    import logging

    from pyro_vmm.quiet import log_to_file

    lib = logging.getLogger("pyro_vmm_test_lib")
    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)
    lib.addHandler(handler)
    lib.propagate = False
    try:
        with log_to_file("pyro_vmm_test_lib", tmp_path / "lib.log"):
            logging.getLogger("pyro_vmm_test_lib.metrics").info("B cells consist of a single batch. Skip.")
        assert "single batch" in (tmp_path / "lib.log").read_text() and terminal.getvalue() == ""
        assert lib.handlers == [handler] and lib.propagate is False
        lib.warning("after")
        assert "after" in terminal.getvalue()
    finally:
        lib.removeHandler(handler)


def _fake_trial(batch_size: int, plr: float, seed: int) -> dict:
    """Utilized clusters fall with batch size and PLR (as in the paper's Figure 5); the score peaks at 256 / 2.5."""
    used = 40 * 128 / batch_size / plr + seed
    score = 1.0 - abs(np.log2(batch_size / 256)) * 0.1 - abs(plr - 2.5) * 0.05 + 0.01 * seed
    return {"utilized_clusters": used, "Total": score}


def test_tuning_sweep_applies_the_paper_admission_rule_and_stops_early():
    calls = []

    def trial(b, p, s):
        calls.append((b, p, s))
        return _fake_trial(b, p, s)

    grid = TuningGrid(batch_sizes=(128, 256, 512), prior_lr_ratios=(1.0, 2.5, 5.0, 10.0), seeds=(0, 1))
    sweep = tuning_sweep(trial, n_labels=8, grid=grid, progress=False)
    # mean utilized clusters = 40 * 128 / B / PLR + 0.5; the PLR loop stops after the first mean below 8:
    # B=128 runs PLR 1..10 (10 -> 4.5), B=256 stops after PLR 5 (4.5), B=512 after PLR 2.5 (4.5)
    assert (512, 5.0, 0) not in calls and (512, 2.5, 1) in calls and (256, 10.0, 0) not in calls
    assert len(calls) == len(sweep) == 2 * (4 + 3 + 2)
    eligible = sweep.groupby(["batch_size", "prior_lr_ratio"])["eligible"].first()
    assert eligible[(128, 5.0)] and not eligible[(128, 10.0)] and not eligible[(512, 2.5)] and eligible[(512, 1.0)]
    best = select_tuning_config(sweep, score="Total")
    assert (best["batch_size"], best["prior_lr_ratio"]) == (256, 2.5)
    with pytest.raises(ValueError, match="no configuration"):
        select_tuning_config(tuning_sweep(trial, n_labels=10_000, grid=grid, progress=False))


def test_sweeps_run_in_parts_are_judged_again_as_one():
    """One process per PLR, seeds split across processes: eligibility uses the mean over all seeds of a config."""
    full_grid = TuningGrid(batch_sizes=(128,), prior_lr_ratios=(2.5, 5.0, 10.0), seeds=(0, 1),
                           stop_below_n_labels=False)
    full = tuning_sweep(_fake_trial, n_labels=8, grid=full_grid, progress=False)
    parts = [
        tuning_sweep(_fake_trial, n_labels=8, progress=False,
                     grid=TuningGrid(batch_sizes=(128,), prior_lr_ratios=(plr,), seeds=(seed,),
                                     stop_below_n_labels=False))
        for plr in (2.5, 5.0, 10.0) for seed in (0, 1)
    ]
    # utilized clusters: PLR 2.5 -> 16 / 17, PLR 5 -> 8 / 9, PLR 10 -> 4 / 5 (seed 0 / seed 1)
    merged = mark_eligible(pd.concat(parts, ignore_index=True), n_labels=8)
    key = ["batch_size", "prior_lr_ratio", "seed"]
    pd.testing.assert_frame_equal(merged.sort_values(key).reset_index(drop=True)[full.columns],
                                  full.sort_values(key).reset_index(drop=True))
    assert select_tuning_config(merged) == select_tuning_config(full) == {"batch_size": 128, "prior_lr_ratio": 2.5,
                                                                         "Total": pytest.approx(0.905)}
    # with 9 cell types, seed 1 of PLR 5 alone (9 clusters) would be eligible, but the config's mean is 8.5
    assert mark_eligible(parts[3], n_labels=9)["eligible"].all()
    assert not mark_eligible(pd.concat(parts[2:4], ignore_index=True), n_labels=9)["eligible"].any()


def test_cluster_composition_shows_label_shares_and_batch_mix_by_cluster_size(tmp_path):
    from pyro_vmm.plotting import cluster_composition

    # cluster "b" (5 cells) is the largest -> number 1; "a" (3 cells) -> 2; "c" (1 cell) -> 3
    clusters = ["a", "a", "a", "b", "b", "b", "b", "b", "c"]
    labels = ["T", "T", "B", "B", "B", "B", "B", "NK", "NK"]
    batches = ["s1", "s2", "s1", "s1", "s1", "s1", "s1", "s1", "s2"]
    fig = cluster_composition(clusters, labels, batches, path=tmp_path / "clusters.png")
    assert (tmp_path / "clusters.png").read_bytes()[:8] == PNG_MAGIC
    heat = fig.axes[0]
    bars = next(ax for ax in fig.axes if ax.patches)  # (the colour bar is an axes too)
    share = np.asarray(heat.images[0].get_array())
    assert [t.get_text() for t in heat.get_yticklabels()] == ["B", "NK", "T"]
    np.testing.assert_allclose(share.sum(0), 1.0)
    np.testing.assert_allclose(share[:, 0], [4 / 5, 1 / 5, 0.0])  # cluster 1 = "b"
    np.testing.assert_allclose(share[:, 1], [1 / 3, 0.0, 2 / 3])  # cluster 2 = "a"
    assert [t.get_text() for t in bars.get_xticklabels()] == ["1\n(5)", "2\n(3)", "3\n(1)"]
    s1 = [r.get_height() for r in bars.patches[:3]]  # first batch's bars, clusters in size order
    np.testing.assert_allclose(s1, [1.0, 2 / 3, 0.0])
    assert len(cluster_composition(clusters, batches=batches).axes) == 1  # batches only: one panel
    with pytest.raises(ValueError, match="labels and/or batches"):
        cluster_composition(clusters)
    with pytest.raises(ValueError, match="one per cell"):
        cluster_composition(clusters, labels[:-1])


def test_plot_tuning_sweep_writes_png(tmp_path):
    from pyro_vmm.plotting import plot_tuning_sweep

    grid = TuningGrid(batch_sizes=(128, 256), prior_lr_ratios=(1.0, 5.0), seeds=(0, 1), stop_below_n_labels=False)
    sweep = tuning_sweep(_fake_trial, n_labels=8, grid=grid, progress=False)
    fig = plot_tuning_sweep(sweep, score="Total", path=tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert [ax.get_ylabel() for ax in fig.axes] == ["Utilized clusters", "Total"]
    assert len(fig.axes[0].lines) >= 3  # two PLR lines + the number-of-cell-types line


def test_training_curves_draw_the_history_per_epoch(tmp_path):
    from pyro_vmm.plotting import training_curves

    epochs = pd.Index(np.arange(4), name="epoch")
    history = {  # as VMMSCVI.history: one-column DataFrames indexed by epoch
        "elbo_train": pd.DataFrame({"elbo_train": [9.0, 7.0, 6.0, 5.5]}, index=epochs),
        "elbo_validation": pd.DataFrame({"elbo_validation": [9.5, 7.5, 6.6, 6.1]}, index=epochs),
        "em_loss_train": pd.DataFrame({"em_loss_train": [3.0, 2.0, 1.0, 0.5]}, index=epochs),
        "utilized_clusters_validation": pd.DataFrame({"utilized_clusters_validation": [20, 14, 11, 11]}, index=epochs),
        "lr": pd.DataFrame({"lr": [1e-3] * 4}, index=epochs),  # not drawn
    }
    fig = training_curves(history, path=tmp_path / "training.png")
    assert (tmp_path / "training.png").read_bytes()[:8] == PNG_MAGIC
    assert [ax.get_ylabel() for ax in fig.axes] == ["−ELBO per datum (VI loss)", "EM loss (MAP objective)",
                                                   "utilized clusters"]
    (train, val), (em,), (used,) = (ax.lines for ax in fig.axes)
    np.testing.assert_array_equal(train.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_array_equal(train.get_ydata(), [9.0, 7.0, 6.0, 5.5])
    np.testing.assert_array_equal(val.get_ydata(), [9.5, 7.5, 6.6, 6.1])
    np.testing.assert_array_equal(em.get_ydata(), [3.0, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(used.get_ydata(), [20, 14, 11, 11])

    # plain lists work too; epochs without a value (None) are skipped, panels without data left out
    fig = training_curves({"elbo_train": [4.0, None, 2.0]})
    assert len(fig.axes) == 1
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [1, 3])
    with pytest.raises(ValueError, match="none of"):
        training_curves({"lr": [1e-3]})


def _knn_sets(x, k=10):
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1)[:, :k]


def test_mde_embedding_is_seeded_and_preserves_neighbourhoods():
    from pyro_vmm.mde import mde_embedding

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 100)
    x = (np.eye(3)[y] * 1.5 @ rng.normal(size=(3, 6)) + rng.normal(size=(300, 6))).astype(np.float32)  # connected
    a, b, c = mde_embedding(x, seed=1), mde_embedding(x, seed=1), mde_embedding(x, seed=2)
    assert a.shape == (300, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    overlap = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(_knn_sets(x), _knn_sets(a), strict=True)])
    chance = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(_knn_sets(x), _knn_sets(a[rng.permutation(300)]), strict=True)])
    assert overlap > 0.3 > chance + 0.2


def test_mde_figure_has_the_paper_columns_and_is_written_atomically(tmp_path):
    from pyro_vmm.plotting import mde_figure

    x, y = _blobs(n_per=60)
    obs = pd.DataFrame(
        {"batch": np.tile(["a", "b"], 90), "cell_type": y.astype(str), "vmm_cluster": (y * 7 % 5).astype(str)},
        index=[f"c{i}" for i in range(180)],
    )
    adata = anndata.AnnData(obs=obs, obsm={"X_vmm": x})
    fig = mde_figure(adata, "X_vmm", path=tmp_path / "mde.png", seed=0)
    assert [ax.get_title() for ax in fig.axes] == ["Batch correction", "Bio conservation", "Prior cluster membership"]
    assert (tmp_path / "mde.png").read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["mde.png"]  # no temporary file left behind
    assert adata.obsm["X_vmm_mde"].shape == (180, 2)
    # the cluster column is renumbered 1..n by size
    labels = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert labels == [str(i) for i in range(1, adata.obs["vmm_cluster"].nunique() + 1)]
    with pytest.raises(KeyError, match="colour key 'donor'"):
        mde_figure(adata, "X_vmm", color_keys=("donor",))


def test_exact_neighbors_match_brute_force_with_self_first():
    from pyro_vmm.evaluation import exact_neighbors

    x, _ = _blobs(n_per=30)
    res = exact_neighbors(x, 12)
    np.testing.assert_array_equal(res.indices[:, 0], np.arange(len(x)))
    np.testing.assert_array_equal(np.sort(res.indices[:, 1:], 1), np.sort(_knn_sets(x, 11), 1))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.testing.assert_allclose(res.distances, np.take_along_axis(d, res.indices, 1), rtol=1e-4, atol=1e-4)


def test_vmm_scvi_trial_runs_in_a_sweep():
    from pyro_vmm.evaluation import vmm_scvi_trial

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 60)
    counts = rng.poisson(rng.gamma(1.0, 2.0, size=(2, 50))[y]).astype(np.float32)
    counts[:, 0] += 1
    adata = anndata.AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": y.astype(str), "batch": np.tile(["a", "b"], 60)}, index=[f"c{i}" for i in range(120)]),
    )
    trial = vmm_scvi_trial(
        adata, "batch", "cell_type", model_kwargs={"n_clusters": 6, "n_latent": 3},
        train_kwargs={"max_epochs": 1, "enable_progress_bar": False}, scib=False,
    )
    sweep = tuning_sweep(trial, n_labels=2, grid=TuningGrid(batch_sizes=(32, 64), prior_lr_ratios=(1.0,)), progress=False)
    assert list(sweep["batch_size"]) == [32, 64]
    assert sweep["utilized_clusters"].between(1, 6).all() and sweep["nmi_unmerged"].between(0, 1).all()
    assert "X_vmm" not in adata.obsm  # the trial trains on a copy


def test_knn_label_transfer_matches_sklearn_and_reports_vote_shares():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    ref, query = rng.normal(size=(200, 3)), rng.normal(size=(80, 3))
    labels = rng.choice(["T", "B", "NK", "Mono"], size=200)
    out = knn_label_transfer(ref, labels, query, k=15)
    expected = KNeighborsClassifier(n_neighbors=15).fit(ref, labels).predict(query)
    assert (out.labels == expected).all()
    # hand case: 3 reference cells near the query cell (2 "a", 1 "b"), k = 3 -> "a" with 2/3 of the votes
    ref = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2], [9.0, 9.0]])
    out = knn_label_transfer(ref, ["a", "a", "b", "c"], np.array([[0.05, 0.05], [9.0, 8.9]]), k=3)
    assert list(out.labels) == ["a", "a"] and np.allclose(out.confidence, [2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="one entry per reference cell"):
        knn_label_transfer(ref, ["a"], ref)
    with pytest.raises(ValueError, match="dimensions"):
        knn_label_transfer(ref, list("aabc"), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="k must be"):
        knn_label_transfer(ref, list("aabc"), ref, k=5)


def test_label_transfer_scores_by_hand():
    # true a a b b, predicted a b b c: accuracy 2/4; F1 a = 2/3, b = 1/2, c = 0 (predicted, never true) -> macro 7/18
    scores = label_transfer_scores(list("aabb"), list("abbc"))
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)

