"""The image training loop: early stopping on the validation loss, best-weight restore, divergence, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_vmm import set_seed
from pyro_vmm.images.evaluation import cluster_probabilities, evaluate_clustering, latent_representation
from pyro_vmm.images.training import TrainingConfig, fit_minibatches, split_validation, train_image_model
from pyro_vmm.models.vae import ImageVAE
from pyro_vmm.priors import build_prior


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Counter(torch.nn.Module):
    """A module whose single weight counts the training epochs (one step per epoch: batch = all data)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.prior = build_prior("normal", 2)


def _scripted(val_losses):
    module = Counter()
    calls = iter(val_losses)

    def step(batch):
        with torch.no_grad():
            module.w += 1
        return float(module.w.detach()), None

    def val_loss(batch):
        return next(calls)

    return module, step, val_loss


def test_early_stopping_restores_the_best_epoch():
    module, step, val = _scripted([5.0, 4.0, 3.0, 3.5, 3.2, 3.9, 1.0])
    cfg = TrainingConfig(epochs=20, batch_size=8, patience=3, progress=False, eval_batch_size=8)
    hist = fit_minibatches(module, torch.zeros(8, 2), torch.zeros(8, 2), cfg, step, val)
    assert hist.stop_reason == "early_stopping"
    assert hist.epochs_run == 6 and hist.best_epoch == 2  # 3 epochs without improving on 3.0
    assert float(module.w) == 3.0  # the weights after epoch index 2 (the third step)
    assert hist.val_loss == [5.0, 4.0, 3.0, 3.5, 3.2, 3.9]
    assert hist.train_loss == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_without_patience_runs_all_epochs_and_still_keeps_the_best():
    module, step, val = _scripted([2.0, 1.0, 1.5, 1.7])
    cfg = TrainingConfig(epochs=4, batch_size=8, patience=None, progress=False, eval_batch_size=8)
    hist = fit_minibatches(module, torch.zeros(8, 2), torch.zeros(8, 2), cfg, step, val)
    assert (hist.stop_reason, hist.epochs_run, hist.best_epoch, float(module.w)) == ("max_epochs", 4, 1, 2.0)


def test_divergence_stops_and_keeps_the_last_good_weights():
    module = Counter()

    def step(batch):
        with torch.no_grad():
            module.w += 1
            if module.w > 2:
                module.w.fill_(math.nan)
                raise ValueError("Expected parameter loc ... but found invalid values")
        return 1.0, None

    cfg = TrainingConfig(epochs=10, batch_size=8, patience=5, progress=False, eval_batch_size=8)
    with pytest.warns(UserWarning, match="diverged"):
        hist = fit_minibatches(module, torch.zeros(8, 2), torch.zeros(8, 2), cfg, step, lambda b: 1.0)
    assert hist.stop_reason == "non_finite_loss" and hist.epochs_run == 3
    assert float(module.w) == 1.0  # epoch 0 was the best (later epochs never improved on val 1.0)


def test_errors_that_are_not_divergence_propagate():
    module = Counter()

    def step(batch):
        raise ValueError("a genuine bug")

    cfg = TrainingConfig(epochs=2, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="genuine"):
        fit_minibatches(module, torch.zeros(8, 2), None, cfg, step, lambda b: 0.0)


def test_minibatches_cover_every_image_once_per_epoch():
    seen = []
    module = Counter()

    def step(batch):
        seen.append(batch[:, 0].clone())
        return 0.0, None

    x = torch.arange(10.0)[:, None].repeat(1, 2)
    fit_minibatches(module, x, None, TrainingConfig(epochs=2, batch_size=4, progress=False), step, lambda b: 0.0)
    assert [len(b) for b in seen] == [4, 4, 2, 4, 4, 2]  # the last partial batch is kept (as the reference)
    assert sorted(torch.cat(seen[:3]).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(seen[:3]), torch.cat(seen[3:]))  # reshuffled each epoch


def test_split_validation_partitions_rows():
    x = torch.arange(20.0)[:, None]
    tr, va = split_validation(x, 0.25, seed=0)
    assert len(va) == 5 and sorted(torch.cat([tr, va]).flatten().tolist()) == list(range(20))
    assert split_validation(x, 0.0, 0)[1] is None
    with pytest.raises(ValueError):
        TrainingConfig(val_fraction=1.0)


def test_train_image_model_is_repeatable_and_evaluation_protocols():
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(3, 10, generator=g) * 2 - 1
    labels = torch.arange(90) % 3
    x = (centers[labels] + 0.05 * torch.randn(90, 10, generator=g)).clamp(-1, 1)

    def run():
        set_seed(1)
        vae = ImageVAE.from_data(x, prior="vmm", n_components=6, n_latent=2, hidden=(16, 16, 16))
        cfg = TrainingConfig(epochs=3, batch_size=30, lr=1e-2, patience=2, progress=False, seed=1)
        return vae, train_image_model(vae, x, cfg)

    (a, ha), (b, hb) = run(), run()
    assert ha.to_dict() | {"seconds": 0} == hb.to_dict() | {"seconds": 0}
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    assert ha.epochs_run == 3 and len(ha.val_loss) == 3 and len(ha.val_clusters) == 3
    # one posterior draw per image (seeded) vs the posterior mean
    z1, z2 = latent_representation(a, x, seed=5), latent_representation(a, x, seed=5)
    zm = latent_representation(a, x, sample=False, batch_size=7)
    assert torch.equal(z1, z2) and not torch.equal(z1, zm)
    torch.testing.assert_close(zm, a.posterior(x).mean.detach())
    probs = cluster_probabilities(a, x, sample=False)
    assert probs.shape == (90, 6) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    scores = evaluate_clustering(a, x, labels, sample=False)
    assert scores.utilized_clusters == np.unique(probs.argmax(1)).size


def test_guard_rolls_back_nan_steps_lowers_the_lr_and_gives_up_after_max_retries(caplog):
    import logging

    from pyro_vmm.guard import NonFiniteError, NonFiniteGuard

    module = Counter()
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    poison = {2, 3}  # the 3rd and 4th steps go NaN

    def step(batch):
        opt.zero_grad()
        n = step.calls
        step.calls += 1
        loss = (module.w - 10.0) ** 2 * (math.nan if n in poison else 1.0)
        loss.backward()
        opt.step()
        return float(loss.detach()), None

    step.calls = 0
    cfg = TrainingConfig(epochs=6, batch_size=8, patience=None, progress=False, eval_batch_size=8)
    guard = NonFiniteGuard(module, opt, max_retries=3)
    with caplog.at_level(logging.WARNING, logger="pyro_vmm.guard"):
        hist = fit_minibatches(module, torch.zeros(8, 2), None, cfg, step, lambda b: 1.0, guard=guard)
    assert hist.nan_rollbacks == 2 and hist.stop_reason == "max_epochs"
    assert "at epoch 2, batch 0" in caplog.text and "at epoch 3, batch 0" in caplog.text
    assert opt.param_groups[0]["lr"] == 0.25
    assert math.isfinite(float(module.w)) and math.isnan(hist.train_loss[2])  # no kept step in epochs 2 and 3
    assert all(math.isfinite(v) for i, v in enumerate(hist.train_loss) if i not in (2, 3))

    poison.update(range(100))
    with pytest.raises(NonFiniteError, match="4 times in a row"):
        fit_minibatches(module, torch.zeros(8, 2), None, cfg, step, lambda b: 1.0, guard=guard)
    assert math.isfinite(float(module.w))


def _three_blobs(n: int = 90) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(3, 10, generator=g) * 2 - 1
    labels = torch.arange(n) % 3
    return (centers[labels] + 0.05 * torch.randn(n, 10, generator=g)).clamp(-1, 1), labels


def test_distribution_validation_changes_no_number():
    """Training skips Pyro's distribution checks by default; with them on, every weight and loss is the same."""
    x, _ = _three_blobs()

    def run(validate: bool):
        set_seed(2)
        vae = ImageVAE.from_data(x, prior="vmm", n_components=6, n_latent=2, hidden=(16, 16, 16))
        cfg = TrainingConfig(epochs=2, batch_size=30, lr=1e-2, patience=None, progress=False, seed=2,
                             validate_distributions=validate)
        return vae, train_image_model(vae, x, cfg)

    (a, ha), (b, hb) = run(True), run(False)
    assert ha.to_dict() | {"seconds": 0} == hb.to_dict() | {"seconds": 0}
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


def test_validate_vi_forces_or_leaves_pyro_validation():
    import pyro

    from pyro_vmm.infer import AlternatingSVI

    x, _ = _three_blobs(12)
    x[0, 0] = math.nan  # caught by the checks (a site's parameters or value), silent without them
    vae = ImageVAE.from_data(x.nan_to_num(), prior="vmm", n_components=4, n_latent=2, hidden=(8, 8, 8))
    with pyro.validation_enabled(False), pytest.raises(ValueError):
        AlternatingSVI(vae, validate_vi=True).vi_loss(x)
    with pyro.validation_enabled(True):
        assert math.isnan(float(AlternatingSVI(vae, validate_vi=False).vi_loss(x)))
        with pytest.raises(ValueError):
            AlternatingSVI(vae).vi_loss(x)  # None: Pyro's global setting stands
    with pyro.validation_enabled(False):
        assert math.isnan(float(AlternatingSVI(vae).vi_loss(x)))


def test_val_score_drives_early_stopping_and_the_loss_is_only_recorded():
    module, step, val = _scripted([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    scores = iter([0.2, 0.6, 0.5, 0.4, 0.55, 0.3])
    cfg = TrainingConfig(epochs=20, batch_size=8, patience=3, progress=False, eval_batch_size=8)
    hist = fit_minibatches(
        module, torch.zeros(8, 2), torch.zeros(8, 2), cfg, step, val, val_score=lambda: next(scores)
    )
    # the loss improves every epoch, but the score peaks at epoch index 1 and stays below it for 3 epochs
    assert (hist.monitor, hist.stop_reason, hist.epochs_run, hist.best_epoch) == ("nmi", "early_stopping", 5, 1)
    assert float(module.w) == 2.0 and hist.val_nmi == [0.2, 0.6, 0.5, 0.4, 0.55]
    assert hist.val_loss == [5.0, 4.0, 3.0, 2.0, 1.0]


def _blobs(n=90, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(k, 10, generator=g) * 2 - 1
    labels = torch.arange(n) % k
    return (centers[labels] + 0.05 * torch.randn(n, 10, generator=g)).clamp(-1, 1), labels


def test_nmi_monitor_keeps_the_epoch_with_the_best_validation_nmi():
    x, _ = _blobs(150)
    xv, yv = _blobs(30, seed=1)
    set_seed(1)
    vae = ImageVAE.from_data(x, prior="vmm", n_components=6, n_latent=2, hidden=(16, 16, 16))
    cfg = TrainingConfig(epochs=8, batch_size=30, lr=3e-3, patience=None, progress=False, seed=1, monitor="nmi")
    hist = train_image_model(vae, x, cfg, x_val=xv, y_val=yv)
    assert hist.monitor == "nmi" and len(hist.val_nmi) == 8 and len(hist.val_loss) == 8
    assert hist.best_epoch == int(np.argmax(hist.val_nmi)) < 7  # an earlier epoch than the last is restored
    # the restored weights give the recorded score again (the monitor's draws are seeded)
    from pyro_vmm.images.training import nmi_monitor

    assert nmi_monitor(vae, xv, yv, cfg)() == pytest.approx(max(hist.val_nmi))


def test_nmi_monitor_errors_name_the_fix():
    x, y = _blobs()
    vae = ImageVAE.from_data(x, prior="vmm", n_components=6, n_latent=2, hidden=(16, 16, 16))
    cfg = TrainingConfig(epochs=1, batch_size=30, progress=False, monitor="nmi")
    with pytest.raises(ValueError, match="needs x_val and y_val"):
        train_image_model(vae, x, cfg)
    with pytest.raises(ValueError, match="needs x_val and y_val"):  # labels without the images they label
        train_image_model(vae, x, cfg, y_val=y)
    with pytest.raises(ValueError, match="29 labels for 30"):
        train_image_model(vae, x, cfg, x_val=x[:30], y_val=y[:29])
    normal = ImageVAE.from_data(x, prior="normal", n_latent=2, hidden=(16, 16, 16))
    with pytest.raises(ValueError, match="mixture prior"):
        train_image_model(normal, x, cfg, x_val=x[:30], y_val=y[:30])
    with pytest.raises(ValueError, match="monitor must be one of"):
        TrainingConfig(monitor="accuracy")
