"""Reference mapping (``VMMSCVI.load_query_data``, ``pyro_vmm.scvi._query``) on a small real subset.

Data: 300 random cells x the 200 highest-count genes of ../shared/data/scrna/kang_ifnb_2800.h5ad.  "sample" splits
the control cells at random into c1 / c2; the stimulated cells are s1.  The reference is trained on c1 + s1; the
query is c2 -- control cells like c1, in a batch the reference has never seen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("scvi")

from _data import kang_subset

from pyro_vmm.scvi import VMMSCVI
from pyro_vmm.validation import InputError

SMALL = {"n_latent": 10, "n_hidden": 64, "n_clusters": 8}
TRAIN = {"batch_size": 64, "enable_progress_bar": False, "early_stopping": False}


@pytest.fixture(scope="module")
def split(shared_data):
    a = kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad")
    ctrl = (a.obs["batch"] == "CTRL").to_numpy()
    a.obs["sample"] = np.where(ctrl, np.where(np.arange(a.n_obs) % 2, "c1", "c2"), "s1")
    ref = a[a.obs["sample"] != "c2"].copy()
    query = a[a.obs["sample"] == "c2"].copy()
    VMMSCVI.setup_anndata(ref, batch_key="sample", labels_key="cell_type")
    # the batch in the encoder too (encode_covariates=True), so that both first layers have batch columns to map;
    # the default architecture (decoder only) is mapped in test_covariates.py
    model = VMMSCVI(ref, seed=0, encode_covariates=True, **SMALL)
    model.train(max_epochs=60, seed=0, n_epochs_kl_warmup=None, **TRAIN)
    return model, ref, query


@pytest.mark.parametrize("train_encoder", [None, True])
def test_query_model_trains_only_the_new_batch_columns_and_keeps_the_reference_exact(split, train_encoder):
    model, ref, query = split
    q = VMMSCVI.load_query_data(query.copy(), model, train_encoder=train_encoder)
    assert q.query_train_encoder_ is bool(train_encoder)  # default: the decoder's column only, under the VMM prior
    assert list(q.adata_manager.get_state_registry("batch").categorical_mapping) == ["c1", "s1", "c2"]
    assert not q.is_trained_
    start = {k: v.clone() for k, v in q.module.state_dict().items()}
    q.train(max_epochs=30, seed=0, **TRAIN)
    end = q.module.state_dict()
    ref_state = model.module.state_dict()

    g, d = q.module.n_input, q.module.n_latent
    enc = "encoder.fc_layers.Layer 0.0.weight"
    dec = "decoder.px_decoder.fc_layers.Layer 0.0.weight"
    for key, value in end.items():
        if key in (enc, dec):
            width = ref_state[key].shape[1]
            torch.testing.assert_close(value[:, :width], ref_state[key], rtol=0, atol=0)  # old columns: untouched
            assert torch.equal(start[key][:, width:], torch.zeros_like(value[:, width:]))  # new column started at 0
            trains = key == dec or bool(train_encoder)
            assert (value[:, width:].abs().max() > 0) == trains  # ... and was trained (the encoder's if asked)
            assert width == (g if key == enc else d) + 2
        elif key.endswith("num_batches_tracked"):
            continue
        elif "pseudo_inputs" in key:
            torch.testing.assert_close(value[:, : g + 2], ref_state[key], rtol=0, atol=0)
            assert (value[:, g + 2] == -1e4).all()  # the new batch has weight 0 in every pseudo-input's softmax
        else:
            assert torch.equal(value, ref_state[key]), key  # everything else frozen: prior, dispersion, BN stats

    # the reference cells map exactly as before, clusters and all
    np.testing.assert_array_equal(q.get_latent_representation(ref), model.get_latent_representation())
    np.testing.assert_array_equal(q.get_cluster_probabilities(ref), model.get_cluster_probabilities())


def test_mapped_query_fits_as_well_as_embedding_it_as_its_true_batch(split):
    """c2 cells are control cells: embedded by the reference *as c1* they are at home.  The query model, which
    knows nothing of that, starts with zero weights for c2 and must improve its fit of them by training those
    weights alone, ending within 1 % of the as-c1 ELBO (20 seeded Monte Carlo draws, the same for every model)."""
    model, _ref, query = split
    as_c1 = query.copy()
    as_c1.obs["sample"] = "c1"
    def elbo(m, adata=None):  # mean over 20 seeded Monte Carlo draws (the same draws for every model)
        torch.manual_seed(0)
        return -np.mean([m.get_elbo(adata) for _ in range(20)])  # -ELBO

    oracle = elbo(model, as_c1)
    q = VMMSCVI.load_query_data(query.copy(), model)
    q.is_trained_ = True
    untrained = elbo(q)
    q.train(max_epochs=150, lr=1e-2, seed=0, **TRAIN)  # 300 steps on ~100 cells: a larger step than the default
    trained = elbo(q)
    # measured: as c1 420.1, untrained 423.1, trained 422.3 nats per cell
    assert trained < untrained - 0.3, (untrained, trained)
    assert trained <= oracle * 1.01, (oracle, trained)


def test_a_one_batch_reference_maps_a_new_batch(shared_data):
    a = kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad", n_cells=200, n_genes=100)
    ref = a[a.obs["batch"] == "CTRL"].copy()
    query = a[a.obs["batch"] == "STIM"].copy()
    VMMSCVI.setup_anndata(ref, batch_key="batch")
    model = VMMSCVI(ref, seed=0, **SMALL)
    model.train(max_epochs=5, seed=0, **TRAIN)
    assert model.module.n_batch_input == 0  # one batch: no batch input to the encoder
    q = VMMSCVI.load_query_data(query, model)
    q.train(max_epochs=5, seed=0, **TRAIN)
    np.testing.assert_array_equal(q.get_latent_representation(ref), model.get_latent_representation())
    # the encoder input widened from G to G + 2 columns (zero weights): equal up to float summation order
    np.testing.assert_allclose(q.get_cluster_probabilities(ref), model.get_cluster_probabilities(), atol=1e-6)
    assert q.get_latent_representation().shape == (query.n_obs, SMALL["n_latent"])


def test_query_model_saves_and_loads(split, tmp_path):
    model, _ref, query = split
    q = VMMSCVI.load_query_data(query.copy(), model)
    q.train(max_epochs=2, seed=0, **TRAIN)
    q.save(str(tmp_path / "q"))
    loaded = VMMSCVI.load(str(tmp_path / "q"), adata=q.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), q.get_latent_representation())

    # the loaded query model is frozen as the one it was saved from: training it again moves only the new columns
    assert loaded.module.frozen_prior and loaded.reference_batches_ == ["c1", "s1"]
    trainable = [name for name, p in loaded.module.named_parameters() if p.requires_grad]
    assert trainable == ["decoder.px_decoder.fc_layers.Layer 0.0.weight"]  # the VMM default, saved with the model
    assert loaded.query_train_encoder_ is False
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    loaded.train(max_epochs=2, seed=1, **TRAIN)
    after = loaded.module.state_dict()
    width = model.module.state_dict()["encoder.fc_layers.Layer 0.0.weight"].shape[1]
    for key, value in after.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("Layer 0.0.weight"):
            cols = width if key.startswith("encoder") else width - q.module.n_input + q.module.n_latent
            assert torch.equal(value[:, :cols], before[key][:, :cols]), key
            assert torch.equal(value[:, cols:], before[key][:, cols:]) == key.startswith("encoder"), key
        else:
            assert torch.equal(value, before[key]), key  # prior, dispersion, BatchNorm statistics: frozen
    np.testing.assert_array_equal(loaded.get_latent_representation(_ref), model.get_latent_representation())


def test_query_mapping_errors(split, shared_data):
    model, ref, query = split
    with pytest.raises(InputError, match="no batch the reference lacks"):
        VMMSCVI.load_query_data(ref.copy(), model)
    with pytest.raises(TypeError, match="must be a trained VMMSCVI or the folder it was saved to"):
        VMMSCVI.load_query_data(query.copy(), 42)
    with pytest.raises(InputError, match="no saved model at 'runs/missing/model.pt'"):
        VMMSCVI.load_query_data(query.copy(), "runs/missing")
    with pytest.raises(InputError, match="genes of the query AnnData do not match"):
        VMMSCVI.load_query_data(query[:, :-5].copy(), model)
    no_labels = query.copy()
    del no_labels.obs["cell_type"]
    with pytest.raises(InputError, match="labels_key the model was set up with"):
        VMMSCVI.load_query_data(no_labels, model)
    single = ref.copy()
    VMMSCVI.setup_anndata(single)
    unbatched = VMMSCVI(single, seed=0, **SMALL)
    unbatched.train(max_epochs=1, seed=0, **TRAIN)
    with pytest.raises(InputError, match="without a batch_key"):
        VMMSCVI.load_query_data(query.copy(), unbatched)


def test_a_query_with_an_empty_gene_is_warned_about_once(split):
    import warnings

    from pyro_vmm.validation import InputWarning

    model, _ref, query = split
    from scipy import sparse

    q = query.copy()
    counts = sparse.lil_matrix(q.X)
    counts[:, 3] = 0
    q.X = counts.tocsr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        VMMSCVI.load_query_data(q, model)
    empty = [w for w in caught if issubclass(w.category, InputWarning) and "zero counts" in str(w.message)]
    assert len(empty) == 1, [str(w.message) for w in empty]


def test_new_columns_get_gradients_in_query_training(split):
    """Frozen BatchNorm normalises with the reference's statistics during query training.  On minibatch statistics a
    one-batch minibatch cancels the shift its new column adds to every cell, and the column's gradient is ~1e-7
    (float noise that Adam would turn into steps of size lr)."""
    from pyro_vmm.infer import AlternatingSVI
    from pyro_vmm.scvi._query import _first_layer_weights

    model, _ref, query = split
    q = VMMSCVI.load_query_data(query.copy(), model, train_encoder=True)
    enc, dec = _first_layer_weights(q.module)
    with torch.no_grad():  # a non-zero decoder column too, so both paths carry a signal
        enc[:, -1], dec[:, -1] = 0.01, 0.01
    x, b = next(q._minibatches(batch_size=64))
    assert (b == b[0]).all()  # one batch in the minibatch: the case minibatch statistics break
    q.module.train()
    q.module.zero_grad()
    AlternatingSVI(q.module, make_optimizers=False).vi_loss(x, b).backward()
    assert enc.grad[:, -1].abs().max() > 1e-2 and dec.grad[:, -1].abs().max() > 1e-2
    assert all(not m.training for m in q.module.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert any(m.training for m in q.module.modules() if isinstance(m, torch.nn.Dropout))  # dropout stays on


def test_prepare_query_anndata_and_mapping_from_a_saved_folder(split, tmp_path):
    """scvi-tools' route: prepare_query_anndata (missing genes as zeros, the reference's order) and
    load_query_data with the reference's saved folder, which gives the same query model as the model object."""
    model, ref, query = split
    model.save(tmp_path / "ref", overwrite=True)
    genes = list(ref.var_names)
    raw = query[:, genes[::-1][10:]].copy()  # 10 reference genes missing, the others reversed
    raw.var["note"] = "x"
    raw.layers["counts"] = raw.X.copy()
    for reference in (model, tmp_path / "ref", str(tmp_path / "ref")):
        ready = VMMSCVI.prepare_query_anndata(raw, reference, inplace=False)
        assert list(ready.var_names) == genes and raw.n_vars == 190  # raw left as it was
        assert list(VMMSCVI.prepare_query_anndata(raw, reference, return_reference_var_names=True)) == genes
    missing = ~ref.var_names.isin(raw.var_names)
    assert missing.sum() == 10 and ready[:, missing].X.sum() == 0 and ready.layers["counts"][:, missing].sum() == 0
    np.testing.assert_array_equal(ready[:, raw.var_names].X.toarray(), raw.X.toarray())
    assert list(ready.obs_names) == list(raw.obs_names) and "sample" in ready.obs
    assert VMMSCVI.prepare_query_anndata(raw, model) is None and list(raw.var_names) == genes  # in place
    with pytest.raises(InputError, match="none of the reference's 200 genes"):
        VMMSCVI.prepare_query_anndata(raw[:, :0].copy(), model)

    from_object = VMMSCVI.load_query_data(query.copy(), model)
    from_folder = VMMSCVI.load_query_data(query.copy(), str(tmp_path / "ref"))
    assert from_folder.reference_batches_ == from_object.reference_batches_ == ["c1", "s1"]
    for (k1, v1), (k2, v2) in zip(from_object.module.state_dict().items(), from_folder.module.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    mapping = from_folder.adata_manager.get_state_registry("batch").categorical_mapping
    assert list(mapping) == ["c1", "s1", "c2"] and from_folder.query_train_encoder_ == from_object.query_train_encoder_
