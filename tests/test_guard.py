"""The non-finite guard on a real AlternatingSVI: exact rollback, lower learning rate, give up with a clear error."""

from __future__ import annotations

import copy
import logging

import pyro
import pytest
import torch

from pyro_vmm import AlternatingSVI, set_seed
from pyro_vmm.guard import NonFiniteError, NonFiniteGuard, guarded_step
from pyro_vmm.infer import StepResult

LR = 1e-2


@pytest.fixture
def setup(toy_vae):
    set_seed(0)
    vae = toy_vae(prior="vmm", n_components=4)
    svi = AlternatingSVI(vae, lr=LR, prior_lr_ratio=0.5)
    guard = NonFiniteGuard(vae, svi.optimizers, max_retries=3, lr_factor=0.5)
    x = torch.randn(32, 6)
    assert guarded_step(guard, lambda: svi.step(x))
    return vae, svi, guard, x


def _state(vae, svi):
    return copy.deepcopy(vae.state_dict()), copy.deepcopy(svi.state_dict())  # deep: Adam updates in place


def _assert_state_equal(vae, svi, saved) -> None:
    module, optim = saved
    for key, value in vae.state_dict().items():
        assert torch.equal(value, module[key]), key
    now = svi.state_dict()
    for part in ("vi", "em"):
        for idx, slots in optim[part]["state"].items():
            for name, value in slots.items():
                assert torch.equal(now[part]["state"][idx][name], value), (part, idx, name)


def _nan_batch(x):
    bad = x.clone()
    bad[3, 1] = float("nan")
    return bad


@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize("validation", [True, False], ids=["distribution-validation", "no-validation"])
def test_nan_batch_is_rolled_back_exactly_and_training_continues(setup, validation, caplog):
    vae, svi, guard, x = setup
    before = _state(vae, svi)
    with pyro.validation_enabled(validation), caplog.at_level(logging.WARNING, logger="pyro_vmm.guard"):
        assert not guarded_step(guard, lambda: svi.step(_nan_batch(x)))
    # with validation the distribution check raises; without it the step runs and leaves NaN parameters/buffers
    assert ("invalid values" in guard.last_problem) == validation
    _assert_state_equal(vae, svi, before)  # parameters, BatchNorm statistics and Adam moments all restored
    assert guard.learning_rates() == [LR * 0.5, LR * 0.5 * 0.5]
    assert guard.n_rollbacks == 1 and guard.consecutive_rollbacks == 1
    assert "non-finite training step" in caplog.text and "learning rate now 0.005, 0.0025" in caplog.text

    result = svi.step(x)
    assert guard.check(result) and guard.last_problem is None
    assert torch.isfinite(torch.tensor([result.elbo_loss, result.em_loss])).all()
    assert not torch.equal(vae.decoder.weight, before[0]["decoder.weight"])  # it really trained on
    assert guarded_step(guard, lambda: svi.step(x)) and guard.consecutive_rollbacks == 0


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own warning about the NaN loss we provoke
def test_poisoned_weight_rolls_back_to_the_last_good_parameters(setup):
    vae, svi, guard, x = setup
    before = _state(vae, svi)
    with torch.no_grad():
        vae.decoder.weight[0, 0] = float("nan")
    with pyro.validation_enabled(False):
        assert not guarded_step(guard, lambda: svi.step(x))
    assert "non-finite" in guard.last_problem
    _assert_state_equal(vae, svi, before)
    assert guarded_step(guard, lambda: svi.step(x))
    assert torch.isfinite(vae.decoder.weight).all()


def test_repeated_nans_raise_after_max_retries(setup):
    vae, svi, guard, x = setup
    before = _state(vae, svi)
    bad = _nan_batch(x)
    for i in range(guard.max_retries):
        assert not guarded_step(guard, lambda: svi.step(bad))
        assert guard.consecutive_rollbacks == i + 1
    lrs = guard.learning_rates()
    assert lrs == pytest.approx([LR * 0.5**3, LR * 0.5 * 0.5**3])
    with pytest.raises(NonFiniteError) as err:
        guarded_step(guard, lambda: svi.step(bad))
    message = str(err.value)
    assert "non-finite values 4 times in a row" in message and "invalid values" in message
    assert "lower learning rate" in message and "check" in message and "validate_counts" in message
    _assert_state_equal(vae, svi, before)  # left at the last finite state, e.g. to be saved
    assert guard.learning_rates() == lrs


def test_kept_steps_reset_the_streak(setup):
    vae, svi, guard, x = setup
    bad = _nan_batch(x)
    for _ in range(2):
        for _ in range(guard.max_retries):  # max_retries failures in a row, then a kept step resets the streak
            assert not guarded_step(guard, lambda: svi.step(bad))
        assert guarded_step(guard, lambda: svi.step(x))
    assert guard.n_rollbacks == 2 * guard.max_retries and guard.consecutive_rollbacks == 0


def test_check_finds_non_finite_losses_gradients_and_buffers(setup):
    vae, svi, guard, x = setup
    assert guard.check(StepResult(1.0, None)) and guard.check((torch.tensor(2.0), 3.0))
    assert not guard.check(StepResult(1.0, float("inf"))) and "em_loss=inf" in guard.last_problem
    assert not guard.check({"vi": torch.tensor(float("nan"))}) and "vi=nan" in guard.last_problem
    vae.decoder.bias.grad = torch.full_like(vae.decoder.bias, float("nan"))
    assert not guard.check(0.0) and "gradient of 'decoder.bias' (6 of 6 entries)" in guard.last_problem
    vae.zero_grad(set_to_none=True)
    with torch.no_grad():
        vae.encoder[1].running_var[2] = float("inf")
    assert not guard.check(0.0) and "buffer 'encoder.1.running_var' (1 of 16 entries)" in guard.last_problem
    with pytest.raises(NonFiniteError, match="refusing to snapshot a non-finite state"):
        guard.snapshot()


def test_other_errors_propagate_unchanged(setup):
    vae, svi, guard, x = setup
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        guarded_step(guard, lambda: svi.step(torch.randn(8, 5)))
    assert guard.n_rollbacks == 0


def test_wrapped_optimizers_and_schedulers_are_lowered_too(toy_vae):
    vae = toy_vae(prior="normal", n_components=1)
    svi = AlternatingSVI(vae, lr=LR)
    vi_opt, em_opt = svi.optimizers
    assert em_opt is None  # a None optimiser is ignored

    class Wrapper:  # like lightning's LightningOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    scheduler = torch.optim.lr_scheduler.LambdaLR(vi_opt, lambda epoch: 1.0)
    guard = NonFiniteGuard([vae], [Wrapper(vi_opt), em_opt], schedulers=[scheduler], lr_factor=0.1)
    guard.snapshot()
    guard.last_problem = "injected"
    guard.rollback()
    vi_opt.step()  # (no gradients: a no-op, but schedulers expect it before their own step)
    scheduler.step()  # LambdaLR recomputes lr from base_lrs: the lowering must survive it
    assert guard.learning_rates() == pytest.approx([LR * 0.1])


def test_rollback_needs_a_snapshot_and_arguments_are_checked(toy_vae):
    vae = toy_vae(prior="gmm", n_components=3)
    svi = AlternatingSVI(vae)
    with pytest.raises(RuntimeError, match=r"before any snapshot\(\)"):
        NonFiniteGuard(vae, svi.optimizers).rollback()
    with pytest.raises(ValueError, match="lr_factor must be in"):
        NonFiniteGuard(vae, svi.optimizers, lr_factor=1.5)
    with pytest.raises(ValueError, match="max_retries must be an integer >= 0"):
        NonFiniteGuard(vae, svi.optimizers, max_retries=-1)
    with pytest.raises(TypeError, match="modules must be"):
        NonFiniteGuard("vae", svi.optimizers)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_where_names_the_step_in_the_warning_and_the_error(setup, caplog):
    vae, svi, guard, x = setup
    bad = _nan_batch(x)
    with caplog.at_level(logging.WARNING, logger="pyro_vmm.guard"):
        assert not guarded_step(guard, lambda: svi.step(bad), where="epoch 4, batch 7")
    assert "non-finite training step at epoch 4, batch 7 (" in caplog.text
    guard.consecutive_rollbacks = guard.max_retries
    with pytest.raises(NonFiniteError, match=r"in a row \(last at epoch 5, batch 0: "):
        guarded_step(guard, lambda: svi.step(bad), where="epoch 5, batch 0")


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_store_false_keeps_the_older_snapshot(setup):
    """The cheap mode: kept steps without a refresh; a later failure rolls back past them to the snapshot."""
    vae, svi, guard, x = setup
    snap = _state(vae, svi)
    assert guarded_step(guard, lambda: svi.step(x), store=False)  # kept, not stored
    assert not torch.equal(vae.decoder.weight, snap[0]["decoder.weight"])
    assert not guarded_step(guard, lambda: svi.step(_nan_batch(x)))
    _assert_state_equal(vae, svi, snap)  # back to before the kept-but-unstored step
    guard.consecutive_rollbacks = 1
    assert guarded_step(guard, lambda: svi.step(x), store=False) and guard.consecutive_rollbacks == 0


def test_fast_check_has_no_false_alarm_when_a_sum_overflows(setup):
    vae, svi, guard, x = setup
    with torch.no_grad():
        vae.decoder.weight.fill_(3e38)  # every entry finite, their float32 sum is inf
    assert torch.isinf(vae.decoder.weight.sum())
    assert guard.check(0.0) and guard.last_problem is None
    with torch.no_grad():
        vae.decoder.weight[1, 1] = float("nan")
    assert not guard.check(0.0) and "parameter 'decoder.weight' (1 of 12 entries)" in guard.last_problem
