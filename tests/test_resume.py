"""Checkpoint / resume and NaN safety of VMMSCVI.train, on a tiny real subset (300 cells x 200 genes of kang).

* a run SIGKILLed mid-epoch and restarted on its checkpoint_dir ends bit-identical to an uninterrupted run;
* a poisoned step is rolled back (learning rate halved, warning naming the step), persistent NaNs raise;
* corrupted, foreign or other-data checkpoints give clear errors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

scvi = pytest.importorskip("scvi")
anndata = pytest.importorskip("anndata")

from pyro_vmm.scvi._checkpoint import save_checkpoint  # noqa: E402
from pyro_vmm.guard import NonFiniteError  # noqa: E402
from pyro_vmm.scvi import VMMSCVI  # noqa: E402
from pyro_vmm.validation import InputError  # noqa: E402

from _data import kang_subset  # noqa: E402

TINY = dict(n_latent=4, n_hidden=32, n_clusters=8)
TRAIN = dict(batch_size=64, enable_progress_bar=False, early_stopping=False, seed=3)
ROOT = Path(__file__).resolve().parents[1]


_subset = kang_subset  # the subprocess children import it from here


@pytest.fixture(scope="module")
def small_adata(shared_data):
    return _subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad")


def _setup(adata):
    a = adata.copy()
    VMMSCVI.setup_anndata(a, batch_key="batch")
    return a


# ---------------------------------------------------------------------------------------------------------------
# kill and resume
# ---------------------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, warnings
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import lightning.pytorch as pl
    sys.path.insert(0, {tests!r})
    from test_resume import TINY, TRAIN, _subset
    from pyro_vmm.scvi import VMMSCVI

    mode, ckpt_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    adata = _subset({data!r})
    VMMSCVI.setup_anndata(adata, batch_key="batch")
    seen = []

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            seen.append(trainer.current_epoch)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if mode == "kill" and trainer.current_epoch == 2 and batch_idx == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # epoch 3's 2nd batch; checkpoints 1 and 2 exist

    model = VMMSCVI(adata, seed=0, **TINY)
    model.train(max_epochs=4, checkpoint_dir=ckpt_dir, checkpoint_every=1, callbacks=[Probe()], **TRAIN)
    states = {{"resumed": model.module.state_dict()}}
    history = {{k: v.to_numpy().ravel().tolist() for k, v in model.history.items()}}
    fresh = VMMSCVI(adata, seed=0, **TINY)
    fresh.train(max_epochs=4, **TRAIN)
    states["uninterrupted"] = fresh.module.state_dict()
    torch.save(states, out)
    fresh_history = {{k: v.to_numpy().ravel().tolist() for k, v in fresh.history.items()}}
    print("RESULT " + json.dumps({{"epochs_seen": seen, "history": history, "fresh_history": fresh_history}}))
    """
)


def _run_child(mode: str, ckpt_dir: Path, out: Path, script: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script), mode, str(ckpt_dir), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow  # ~25 s: two subprocesses, each importing scvi-tools and training three times in all
def test_sigkill_mid_epoch_then_resume_is_bit_identical(shared_data, tmp_path):
    script = tmp_path / "child.py"
    data = shared_data / "scrna" / "kang_ifnb_2800.h5ad"
    script.write_text(CHILD.format(tests=str(ROOT / "tests"), data=str(data)))
    ckpt = tmp_path / "ckpt"

    killed = _run_child("kill", ckpt, tmp_path / "unused.pt", script)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in ckpt.glob("checkpoint-*.pt")) == [
        "checkpoint-000000001.pt",
        "checkpoint-000000002.pt",
    ]

    out = tmp_path / "states.pt"
    resumed = _run_child("resume", ckpt, out, script)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads(next(line for line in resumed.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert info["epochs_seen"] == [2, 3]  # continued from the end of epoch 2, did not start over
    states = torch.load(out, weights_only=True)
    a, b = states["resumed"], states["uninterrupted"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ after resume: {different[:5]}"
    # the history of the resumed run is the whole run's (epochs before the kill restored from the checkpoint)
    for key in ("elbo_train", "elbo_validation", "em_loss_train"):
        assert info["history"][key] == info["fresh_history"][key], key
        assert len(info["history"][key]) == 4
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-000000003.pt", "checkpoint-000000004.pt"]


# ---------------------------------------------------------------------------------------------------------------
# NaN injection
# ---------------------------------------------------------------------------------------------------------------
def _poison_vi_loss(monkeypatch, calls: set[int]) -> None:
    """Make the VI loss NaN at the given (0-based) VI-step calls: NaN gradients, then NaN parameters after Adam."""
    from pyro_vmm.infer import AlternatingSVI

    original = AlternatingSVI.vi_loss
    counter = {"n": 0}

    def vi_loss(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        if torch.is_grad_enabled():  # training steps only (validation runs under no_grad)
            counter["n"] += 1
            if counter["n"] - 1 in calls:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(AlternatingSVI, "vi_loss", vi_loss)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_poisoned_step_is_rolled_back_and_training_continues(small_adata, monkeypatch, caplog):
    a = _setup(small_adata)
    # without the guard the same poisoning kills the run (NaN prior parameters: a failed Cholesky factorisation)
    _poison_vi_loss(monkeypatch, {2})
    bare = VMMSCVI(a, seed=0, **TINY)
    with pytest.raises(RuntimeError, match="positive-definite"):
        bare.train(max_epochs=1, nan_guard=False, **TRAIN)
    assert not all(torch.isfinite(p).all() for p in bare.module.parameters())

    _poison_vi_loss(monkeypatch, {2})
    model = VMMSCVI(a, seed=0, **TINY)
    with caplog.at_level(logging.WARNING, logger="pyro_vmm.guard"):
        model.train(max_epochs=2, lr=1e-3, **TRAIN)
    assert all(bool(torch.isfinite(p).all()) for p in model.module.parameters())
    warnings = [r.getMessage() for r in caplog.records if "non-finite training step" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "epoch 0, batch 2" in warnings[0] and "learning rate now 0.0005, 0.0005" in warnings[0]
    assert "non-finite loss" in warnings[0]
    lrs = [g["lr"] for opt in model.trainer.optimizers for g in opt.param_groups]
    assert lrs == [5e-4, 5e-4]  # both optimisers lowered once, and not reset afterwards
    assert model.history["nan_rollbacks"].to_numpy().ravel().tolist() == [1.0, 1.0]
    assert np.isfinite(model.history["elbo_train"].to_numpy().astype(float)).all()


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_persistent_nans_raise_after_max_retries(small_adata, monkeypatch):
    a = _setup(small_adata)
    _poison_vi_loss(monkeypatch, set(range(1, 10_000)))
    model = VMMSCVI(a, seed=0, **TINY)
    with pytest.raises(NonFiniteError, match=r"3 times in a row \(last at epoch 0, batch 3") as err:
        model.train(max_epochs=2, max_nan_retries=2, **TRAIN)
    assert "Try: a lower learning rate" in str(err.value)
    assert all(bool(torch.isfinite(p).all()) for p in model.module.parameters())  # left at the last finite state


def test_cheap_guard_rolls_back_to_an_older_snapshot(small_adata, monkeypatch):
    a = _setup(small_adata)
    _poison_vi_loss(monkeypatch, {3})
    model = VMMSCVI(a, seed=0, **TINY)
    model.train(max_epochs=1, plan_kwargs={"guard_every": 4}, **TRAIN)
    assert all(bool(torch.isfinite(p).all()) for p in model.module.parameters())
    assert model.history["nan_rollbacks"].to_numpy().ravel().tolist() == [1.0]
    with pytest.raises(ValueError, match="guard_every must be an integer >= 1"):
        model.train(max_epochs=1, plan_kwargs={"guard_every": 0}, **TRAIN)


# ---------------------------------------------------------------------------------------------------------------
# bad checkpoints
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_epoch_dir(small_adata, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = VMMSCVI(_setup(small_adata), seed=0, **TINY)
    model.train(max_epochs=1, checkpoint_dir=d, **TRAIN)
    (path,) = d.glob("checkpoint-*.pt")
    return d, path


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_corrupted_checkpoint_is_a_clear_error(small_adata, one_epoch_dir, tmp_path):
    src, path = one_epoch_dir
    model = VMMSCVI(_setup(small_adata), seed=0, **TINY)
    d = _copy_dir(src, tmp_path / "truncated")
    data = path.read_bytes()
    (d / path.name).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"truncated or corrupted.*delete {path.name}"):
        model.train(max_epochs=2, checkpoint_dir=d, **TRAIN)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "checkpoint-000000001.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a pyro-vmm checkpoint"):
        model.train(max_epochs=2, checkpoint_dir=garbage, **TRAIN)
    foreign = tmp_path / "foreign"
    save_checkpoint(foreign / "checkpoint-000000001.pt", {"step": 1}, kind="image-vae")
    with pytest.raises(InputError, match="holds a 'image-vae' checkpoint, expected 'vmm-scvi-training'"):
        model.train(max_epochs=2, checkpoint_dir=foreign, **TRAIN)
    assert not model.is_trained_  # nothing was trained (or written) on failure
    assert sorted(p.name for p in foreign.iterdir()) == ["checkpoint-000000001.pt"]


def test_checkpoint_of_other_data_or_settings_is_refused(small_adata, one_epoch_dir, tmp_path):
    src, _ = one_epoch_dir
    other = small_adata.copy()
    other.var_names = [f"{g}_x" if i == 5 else g for i, g in enumerate(other.var_names)]
    model = VMMSCVI(_setup(other), seed=0, **TINY)
    with pytest.raises(InputError, match=r"different genes \(200 genes in the checkpoint, 200 here; first "
                       r"difference at position 5"):
        model.train(max_epochs=2, checkpoint_dir=_copy_dir(src, tmp_path / "a"), **TRAIN)
    fewer = VMMSCVI(_setup(small_adata[:, :150].copy()), seed=0, **TINY)
    with pytest.raises(InputError, match="different genes"):
        fewer.train(max_epochs=2, checkpoint_dir=_copy_dir(src, tmp_path / "b"), **TRAIN)
    same = VMMSCVI(_setup(small_adata), seed=0, **TINY)
    with pytest.raises(InputError, match="another batch_size"):
        same.train(max_epochs=2, checkpoint_dir=_copy_dir(src, tmp_path / "c"), **{**TRAIN, "batch_size": 32})
    wider = VMMSCVI(_setup(small_adata), seed=0, **{**TINY, "n_latent": 6})
    with pytest.raises(InputError, match="model of another shape"):
        wider.train(max_epochs=2, checkpoint_dir=_copy_dir(src, tmp_path / "d"), **TRAIN)
    with pytest.raises(InputError, match="already holds checkpoints.*resume=False"):
        same.train(max_epochs=2, checkpoint_dir=_copy_dir(src, tmp_path / "e"), resume=False, **TRAIN)


def test_resume_from_a_finished_run_keeps_its_state_and_history(small_adata, one_epoch_dir, tmp_path):
    src, _ = one_epoch_dir
    d = _copy_dir(src, tmp_path / "done")
    a = _setup(small_adata)
    model = VMMSCVI(a, seed=0, **TINY)
    model.train(max_epochs=1, checkpoint_dir=d, **TRAIN)  # nothing left to do: restored, not retrained
    fresh = VMMSCVI(a, seed=0, **TINY)
    fresh.train(max_epochs=1, **TRAIN)
    assert all(torch.equal(v, fresh.module.state_dict()[k]) for k, v in model.module.state_dict().items())
    got = model.history["elbo_train"].to_numpy().ravel()
    assert got.size == 1 and math.isclose(float(got[0]), float(fresh.history["elbo_train"].to_numpy().ravel()[0]))
