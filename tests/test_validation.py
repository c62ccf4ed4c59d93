"""Every bad input gets an InputError naming the problem, where it is, and the fix; valid inputs always pass."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_vmm import validation
from pyro_vmm.validation import (
    CountsSummary,
    InputError,
    InputWarning,
    validate_anndata,
    validate_counts,
    validate_genes_match,
    validate_positive_float,
    validate_positive_int,
)

FORMATS = ["csr", "csc", "coo", "dense", "torch"]


def _as_format(dense: np.ndarray, fmt: str):
    if fmt == "dense":
        return dense
    if fmt == "torch":
        return torch.as_tensor(dense)
    return sp.csr_matrix(dense).asformat(fmt)


def _expected_summary(dense: np.ndarray) -> CountsSummary:
    return CountsSummary(
        n_cells=dense.shape[0],
        n_genes=dense.shape[1],
        n_nonzero=int((dense != 0).sum()),
        max_value=float(dense.max()) if (dense != 0).any() else 0.0,
        is_integer=bool((dense == np.floor(dense)).all()),
        n_empty_cells=int((dense.sum(1) == 0).sum()),
        n_empty_genes=int(((dense != 0).sum(0) == 0).sum()),
    )


@st.composite
def count_matrices(draw):
    n, g = draw(st.integers(1, 25)), draw(st.integers(1, 25))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.floats(0.0, 1.0))
    rng = np.random.default_rng(seed)
    dense = rng.poisson(3.0, size=(n, g)) * (rng.random((n, g)) < density)
    dtype = draw(st.sampled_from([np.int32, np.int64, np.float32, np.float64]))
    return dense.astype(dtype), draw(st.sampled_from(FORMATS))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count_matrices())
def test_valid_integer_matrices_always_pass_and_are_summarised_exactly(matrix):
    dense, fmt = matrix
    assert validate_counts(_as_format(dense, fmt)) == _expected_summary(dense.astype(np.float64))


BAD_VALUES = {
    "NaN": (np.nan, "NaN value"),
    "inf": (np.inf, "infinite value"),
    "-inf": (-np.inf, "infinite value"),
    "negative": (-3.0, "negative value"),
    "fraction": (2.5, "non-integer value"),
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count_matrices(), st.sampled_from(sorted(BAD_VALUES)), st.data())
def test_one_injected_bad_value_is_always_caught_and_located(matrix, kind, data):
    dense, fmt = matrix
    dense = dense.astype(np.float64)
    i = data.draw(st.integers(0, dense.shape[0] - 1))
    j = data.draw(st.integers(0, dense.shape[1] - 1))
    value, words = BAD_VALUES[kind]
    dense[i, j] = value
    with pytest.raises(InputError) as err:
        validate_counts(_as_format(dense, fmt), where="counts")
    message = str(err.value)
    assert message.startswith(f"counts contains 1 {words}")
    assert f"row {i}, column {j}" in message
    assert "Fix:" in message and 'layer="counts"' in message


def test_integer_false_accepts_fractions_but_not_negatives():
    x = np.array([[0.5, 1.0], [2.25, 0.0]])
    assert not validate_counts(x, integer=False).is_integer
    with pytest.raises(InputError, match="negative"):
        validate_counts(-x, integer=False)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (np.zeros((0, 5)), "is empty: 0 cells x 5 genes"),
        (sp.csr_matrix((4, 0)), "is empty: 4 cells x 0 genes"),
        (np.ones(5), "must be a 2-D cells x genes matrix, got shape (5,)"),
        (np.array([["a", "b"]]), "not numbers"),
        (None, "is None"),
        (object(), "must be a 2-D"),
    ],
)
def test_unusable_matrices(bad, words):
    with pytest.raises(InputError) as err:
        validate_counts(bad)
    assert words in str(err.value) and "Fix:" in str(err.value)


def test_sparse_matrices_are_never_densified(monkeypatch):
    x = sp.random(2000, 3000, density=0.001, format="csr", random_state=0)
    x.data = np.ceil(x.data * 5)
    monkeypatch.setattr(sp.csr_matrix, "toarray", lambda *a, **k: pytest.fail("densified"))
    monkeypatch.setattr(sp.csr_matrix, "todense", lambda *a, **k: pytest.fail("densified"))
    assert validate_counts(x).n_nonzero == x.nnz


# ---------------------------------------------------------------------------------------------------------------
# AnnData
# ---------------------------------------------------------------------------------------------------------------
def _adata(n: int = 20, g: int = 8, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(4.0, size=(n, g)).astype(np.float32) + 1
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(["a", "b"] * (n // 2)),
            "cell_type": pd.Categorical(["t", "b", "nk", "t"] * (n // 4)),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(g)])
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs, var=var)
    adata.layers["counts"] = adata.X.copy()
    return adata


def _with_nan_obs(key):
    def make():
        adata = _adata()
        values = adata.obs[key].astype(object)
        values.iloc[[3, 7]] = np.nan
        adata.obs[key] = pd.Categorical(values)
        return adata

    return make


def _with_x(transform):
    def make():
        adata = _adata()
        dense = adata.X.toarray()
        transform(dense)
        adata.X = sp.csr_matrix(dense)
        return adata

    return make


def _set(i, j, v):
    def transform(dense):
        dense[i, j] = v

    return transform


def _zero_cells(dense):
    dense[[2, 5]] = 0


ANNDATA_CASES = {
    "missing layer": (_adata, {"layer": "count"}, ["layer='count' is not in adata.layers", "'counts'", "did you mean"]),
    "no layers": (
        lambda: ad.AnnData(sp.csr_matrix(np.ones((3, 2)))),
        {"layer": "counts"},
        ["adata has no layers", "layer=None"],
    ),
    "batch key typo": (_adata, {"batch_key": "Batch"}, ["batch_key='Batch' is not a column", "Did you mean 'batch'"]),
    "labels key typo": (
        _adata,
        {"labels_key": "celltype"},
        ["labels_key='celltype' is not a column", "'cell_type'", "Available columns"],
    ),
    "NaN batch": (
        _with_nan_obs("batch"),
        {"batch_key": "batch"},
        ["has 2 missing (NaN) value(s) among 20 cells", "'cell3', 'cell7'", "fillna", "notna()"],
    ),
    "NaN labels": (
        _with_nan_obs("cell_type"),
        {"labels_key": "cell_type"},
        ["adata.obs['cell_type'] (labels_key) has 2 missing", "fillna"],
    ),
    "NaN count": (
        _with_x(_set(4, 6, np.nan)),
        {},
        ["adata.X contains 1 NaN value(s)", "cell 'cell4' (row 4), gene 'gene6' (column 6)", "'counts'"],
    ),
    "negative count": (
        _with_x(_set(1, 2, -1)),
        {},
        ["adata.X contains 1 negative value(s)", "cell 'cell1'", "sc.pp.scale", "available layers: 'counts'"],
    ),
    "normalised counts": (
        _with_x(lambda d: np.log1p(d, out=d)),
        {},
        ["non-integer value(s)", "log-transformed", 'layer="counts"', "integer=False"],
    ),
    "zero-count cells": (
        _with_x(_zero_cells),
        {},
        [
            "2 of 20 cells have zero total counts in adata.X",
            "'cell2', 'cell5'",
            "sc.pp.filter_cells(adata, min_counts=1)",
        ],
    ),
    "zero cells": (lambda: _adata()[:0].copy(), {}, ["adata is empty: 0 cells x 8 genes"]),
    "zero genes": (lambda: _adata()[:, :0].copy(), {}, ["adata is empty: 20 cells x 0 genes"]),
    "X is None": (
        lambda: ad.AnnData(obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["g"])),
        {},
        ["adata.X is None", "set adata.X to the counts matrix"],
    ),
    "not an AnnData": (lambda: np.ones((3, 3)), {}, ["expected an AnnData, got a ndarray", "anndata.AnnData"]),
}


@pytest.mark.parametrize("case", sorted(ANNDATA_CASES))
def test_bad_anndata_gets_a_clear_error(case):
    make, kwargs, words = ANNDATA_CASES[case]
    with pytest.raises(InputError) as err:
        validate_anndata(make(), **kwargs)
    message = str(err.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    assert re.search(r"Fix: \S", message) or "Did you mean" in message or "did you mean" in message


def test_empty_genes_warn_by_default_and_fail_on_request():
    adata = _adata()
    dense = adata.X.toarray()
    dense[:, [1, 4]] = 0
    adata.X = sp.csr_matrix(dense)
    with pytest.warns(InputWarning, match=r"2 of 8 genes have zero counts .*'gene1', 'gene4'.*sc\.pp\.filter_genes"):
        summary = validate_anndata(adata)
    assert summary.n_empty_genes == 2
    with pytest.raises(InputError, match=r"sc\.pp\.filter_genes\(adata, min_cells=1\)"):
        validate_anndata(adata, allow_empty_genes=False)


def test_allow_empty_cells_and_valid_anndata_pass_silently():
    adata = _with_x(_zero_cells)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_anndata(adata, allow_empty_cells=True).n_empty_cells == 2
        summary = validate_anndata(_adata(), layer="counts", batch_key="batch", labels_key="cell_type")
    assert summary == _expected_summary(_adata().X.toarray().astype(np.float64))


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_backed_anndata_is_read_in_chunks(tmp_path, monkeypatch, fmt):
    adata = _adata(n=40, g=12, seed=1)
    dense = adata.X.toarray()
    expected = _expected_summary(dense.astype(np.float64))
    dense[33, 9] = 0.5
    adata.X = dense if fmt == "dense" else sp.csr_matrix(dense).asformat(fmt)
    path = tmp_path / f"{fmt}.h5ad"
    adata.write_h5ad(path)
    monkeypatch.setattr(validation.counts, "CHUNK_ENTRIES", 50)  # several chunks of a few rows / columns
    backed = ad.read_h5ad(path, backed="r")
    try:
        where = r"first 0.5 at cell 'cell33' \(row 33\), gene 'gene9' \(column 9\)"
        with pytest.raises(InputError, match=r"1 non-integer value\(s\) \(" + where):
            validate_anndata(backed)
        assert validate_anndata(backed, integer=False).n_nonzero == expected.n_nonzero
    finally:
        backed.file.close()
    clean = _adata(n=40, g=12, seed=1).X
    adata.X = clean.toarray() if fmt == "dense" else clean.asformat(fmt)
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert validate_anndata(backed) == expected
    finally:
        backed.file.close()


def test_real_data_raw_passes_and_normalised_fails(shared_data):
    adata = ad.read_h5ad(shared_data / "scrna" / "cellbench_3cl.h5ad")
    summary = validate_anndata(adata, batch_key="batch", labels_key="cell_type")
    assert summary.is_integer and summary.n_cells == adata.n_obs and summary.n_empty_cells == 0
    adata.layers["counts"] = adata.X.copy()
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    adata.X = sp.csr_matrix(adata.X.multiply(1e4 / totals[:, None])).log1p()  # as sc.pp.normalize_total + log1p
    with pytest.raises(InputError, match=r"adata\.X contains [\d,]+ non-integer value\(s\).*layers: 'counts'"):
        validate_anndata(adata)
    validate_anndata(adata, layer="counts")


# ---------------------------------------------------------------------------------------------------------------
# scalars and gene lists
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "words"),
    [
        (0, "n_components must be >= 1, got 0"),
        (-3, "must be >= 1, got -3"),
        (2.5, "got 2.5 (not a whole number)"),
        (float("nan"), "not a whole number"),
        (float("inf"), "not a whole number"),
        (None, "must be a positive integer, got None"),
        (True, "got True"),
        ("10", "got a str ('10')"),
    ],
)
def test_positive_int_rejects(value, words):
    with pytest.raises(InputError) as err:
        validate_positive_int("n_components", value)
    assert words in str(err.value) and "Fix: pass a whole number >= 1, e.g. n_components=10" in str(err.value)


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (np.int64(7), 7), (4.0, 4), (torch.tensor(3), 3)])
def test_positive_int_accepts(value, expected):
    out = validate_positive_int("k", value)
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value", [0, -1e-3, float("nan"), float("inf"), None, True, "0.1"])
def test_positive_float_rejects(value):
    with pytest.raises(InputError, match=r"lr must be a .*Fix: pass a finite number > 0, e.g. lr=0.001"):
        validate_positive_float("lr", value)
    assert validate_positive_float("lr", np.float32(0.5)) == 0.5


GENES = [f"g{i}" for i in range(10)]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        (GENES[::-1], ["has the model's 10 genes but in a different order", "position 0", "'g0'", "'g9'",
                       "VMMSCVI.prepare_query_anndata(adata, model)"]),
        (GENES[:7], ["3 of the model's genes are missing from query (first: 'g7', 'g8', 'g9')",
                     "adds the missing genes as all-zero columns"]),
        (GENES + ["x1", "x2"], ["the model has 10 genes, query has 12", "2 gene(s) of query are not in the model",
                                "'x1', 'x2'", "Fix: VMMSCVI.prepare_query_anndata(adata, model)"]),
        (GENES[2:] + ["x"], ["2 of the model's genes are missing", "1 gene(s) of query are not in the model"]),
        (GENES + ["g3"], ["1 duplicated gene name(s) (first: 'g3')", "var_names_make_unique"]),
    ],
)
def test_gene_mismatch_messages(query, words):
    with pytest.raises(InputError) as err:
        validate_genes_match(pd.Index(GENES), query)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {str(err.value)!r}"
    assert "Fix:" in str(err.value)
    assert "reference_var_names" not in str(err.value)  # a name the package does not define


def test_matching_genes_pass():
    assert validate_genes_match(GENES, pd.Index(GENES)) is None
