"""Checkpoint files: round trip, every unreadable file named as such, atomic writes, exact resume after SIGKILL."""

from __future__ import annotations

import collections
import io
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vmm import AlternatingSVI, set_seed
from pyro_vmm.scvi._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pyro_vmm.validation import InputError

KIND = "toy-vae"
TESTS_DIR = Path(__file__).resolve().parent


def train(vae_class, run_dir, n_steps: int, *, die_while_saving: int | None = None, restore_rng: bool = True):
    """Train the toy VMM for ``n_steps`` minibatch steps, checkpointing after each; resume from ``run_dir``.

    Minibatches are drawn from the global torch RNG, and the ELBO samples z from it, so an exact resume needs the
    RNG state.  ``die_while_saving=s`` SIGKILLs the process half-way through writing checkpoint ``s``.
    """
    set_seed(0)
    data = torch.randn(64, 6, generator=torch.Generator().manual_seed(123))
    vae = vae_class(prior="vmm", n_components=4)
    svi = AlternatingSVI(vae, lr=1e-2)
    start = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, kind=KIND)
        vae.load_state_dict(state["module"])
        svi.load_state_dict(state["optim"])
        if restore_rng:
            set_rng_state(state["rng"])
        start = state["step"]
    for step in range(start, n_steps):
        svi.step(data[torch.randperm(64)[:16]])
        if die_while_saving == step + 1:
            _die_during_next_save()
        payload = {"module": vae.state_dict(), "optim": svi.state_dict(), "rng": rng_state(), "step": step + 1}
        save_checkpoint(checkpoint_path(run_dir, step + 1), payload, kind=KIND)
    return vae


def _die_during_next_save() -> None:
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------------------------------------
# round trip and header
# ---------------------------------------------------------------------------------------------------------------
def test_round_trip_keeps_every_value_and_writes_a_header(tmp_path, toy_vae):
    vae = toy_vae(prior="gmm", n_components=3)
    svi = AlternatingSVI(vae)
    svi.step(torch.randn(8, 6))
    payload = {
        "module": vae.state_dict(),
        "optim": svi.state_dict(),
        "rng": rng_state(),
        "config": {"n_latent": 2, "lr": 1e-3, "names": ["a", "b"], "shape": torch.Size([2, 3]), "none": None},
        "misc": {"b": b"xy", "s": {1, 2}, "od": collections.OrderedDict(a=1), "dt": torch.float16, "c": 1 + 2j},
    }
    path = save_checkpoint(tmp_path / "sub" / "model.pt", payload, kind=KIND)
    loaded = load_checkpoint(path, kind=KIND)
    for key, value in payload["module"].items():
        assert torch.equal(loaded["module"][key], value)
    assert loaded["config"] == payload["config"] and loaded["misc"] == payload["misc"]
    assert torch.equal(loaded["optim"]["vi"]["state"][0]["exp_avg"], payload["optim"]["vi"]["state"][0]["exp_avg"])
    header = torch.load(path, weights_only=True)
    assert header["format"] == CHECKPOINT_FORMAT and header["version"] == CHECKPOINT_VERSION
    assert header["kind"] == KIND and header["torch_version"] == torch.__version__
    assert header["pyro_version"] == pyro.__version__ and "pyro_vmm_version" in header
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_unloadable_payload_is_refused_before_writing(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(InputError) as err:
        save_checkpoint(path, {"stats": {"mean": np.zeros(3)}}, kind=KIND)
    assert "payload['stats']['mean']" in str(err.value) and "numpy.ndarray" in str(err.value)
    assert "torch.from_numpy" in str(err.value)
    with pytest.raises(InputError, match=r"payload\['cfg'\].*Fix: convert it"):
        save_checkpoint(path, {"cfg": object()}, kind=KIND)
    with pytest.raises(InputError, match="payload must be a dict"):
        save_checkpoint(path, [1, 2], kind=KIND)
    with pytest.raises(InputError, match="kind must be a non-empty string"):
        save_checkpoint(path, {}, kind="")
    assert not path.exists()


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(3)}, kind=KIND)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"x": torch.zeros(3)}, kind=KIND)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path, kind=KIND)["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


# ---------------------------------------------------------------------------------------------------------------
# unreadable files
# ---------------------------------------------------------------------------------------------------------------
class _Foreign:
    pass


def _truncated(path: Path) -> None:
    save_checkpoint(path, {"w": torch.randn(100)}, kind=KIND)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bit_flip(path: Path) -> None:
    save_checkpoint(path, {"w": torch.randn(100)}, kind=KIND)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the tensor's bytes (after the local file header)
    data[start + 10] ^= 0xFF  # the zip structure stays intact, the entry's CRC does not; torch.load would not notice
    path.write_bytes(bytes(data))


def _newer(path: Path) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION + 1, "kind": KIND, "payload": {},
                "pyro_vmm_version": "9.0"}, path)


UNREADABLE = {
    "missing": (lambda p: None, ["checkpoint not found", "latest_checkpoint(folder)"]),
    "folder": (lambda p: p.mkdir(), ["is a folder, not a checkpoint file"]),
    "empty": (lambda p: p.write_bytes(b""), ["is empty (0 bytes)"]),
    "truncated": (_truncated, ["is truncated or corrupted", "zip index is missing", "earlier checkpoint"]),
    "bit flip": (_bit_flip, ["is corrupted: the checksum of its entry", "earlier checkpoint"]),
    "text file": (lambda p: p.write_text("hello, world\n"), ["is not a pyro-vmm checkpoint (it starts with b'hello"]),
    "plain pickle": (lambda p: p.write_bytes(pickle.dumps({"a": 1})), ["plain pickle or a legacy torch.save"]),
    "foreign torch file": (
        lambda p: torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, p),
        ["is not a pyro-vmm checkpoint: it is a torch file holding a dict with keys ['state_dict', 'epoch']"],
    ),
    "foreign torch tensor": (lambda p: torch.save(torch.ones(2), p), ["torch file holding a Tensor"]),
    "foreign objects": (
        lambda p: torch.save({"obj": _Foreign()}, p),
        ["holds Python objects other than tensors", "weights_only=False"],
    ),
    "wrong kind": (
        lambda p: save_checkpoint(p, {}, kind="image-vae"),
        ["holds a 'image-vae' checkpoint, expected 'toy-vae'"],
    ),
    "newer version": (
        _newer,
        [f"format version {CHECKPOINT_VERSION + 1}, written by pyro-vmm 9.0", "upgrade pyro-vmm to 9.0 or later"],
    ),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_checkpoints_get_a_clear_error(tmp_path, case):
    make, words = UNREADABLE[case]
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(InputError) as err:
        load_checkpoint(path, kind=KIND)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {str(err.value)!r}"
    assert "Fix:" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint folders
# ---------------------------------------------------------------------------------------------------------------
def test_latest_checkpoint_skips_temporary_and_truncated_files_and_prune_keeps_the_newest(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing-yet") is None
    for step in (1, 2, 10):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step}, kind=KIND)
    (tmp_path / ".checkpoint-000000011.pt.abc123.tmp").write_bytes(b"PK\x03\x04 half")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)
    _truncated(checkpoint_path(tmp_path, 12))
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
        assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [
        ".checkpoint-000000011.pt.abc123.tmp", "checkpoint-000000001.pt", "checkpoint-000000002.pt"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000000010.pt", "checkpoint-000000012.pt",
                                                          "notes.txt"]
    with pytest.raises(InputError, match="is a file, not a checkpoint folder"):
        latest_checkpoint(tmp_path / "notes.txt")


# ---------------------------------------------------------------------------------------------------------------
# RNG state and exact resume
# ---------------------------------------------------------------------------------------------------------------
def _draws() -> list:
    return [
        random.random(),
        np.random.rand(3).tolist(),
        np.random.randn(),  # exercises NumPy's cached second Gaussian
        torch.rand(3).tolist(),
        pyro.sample("s", dist.Normal(torch.zeros(2), 1.0)).tolist(),
    ]


def test_rng_state_round_trip_makes_two_continuations_identical(tmp_path):
    set_seed(5)
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    state = rng_state()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state}, kind="rng")
    first = _draws()
    second = _draws()
    assert first != second  # the streams move on, so equality below is not vacuous
    set_rng_state(load_checkpoint(tmp_path / "rng.pt", kind="rng")["rng"])
    assert _draws() == first
    set_rng_state(state)
    assert _draws() == first
    with pytest.raises(InputError, match="not an RNG state: missing"):
        set_rng_state({"torch": torch.get_rng_state()})


def test_resume_from_checkpoint_ends_with_the_same_parameters(tmp_path, toy_vae):
    reference = train(toy_vae, tmp_path / "ref", 4)
    train(toy_vae, tmp_path / "run", 2)
    set_seed(999)  # a resumed process starts with other RNG states
    _assert_same_state(train(toy_vae, tmp_path / "run", 4), reference)
    for step in (3, 4):
        checkpoint_path(tmp_path / "run", step).unlink()
    unrestored = train(toy_vae, tmp_path / "run", 4, restore_rng=False)
    assert not torch.equal(unrestored.decoder.weight, reference.decoder.weight)  # the RNG state matters


@pytest.mark.slow
def test_sigkill_while_writing_then_resume_matches_an_uninterrupted_run(tmp_path, toy_vae):
    run_dir = tmp_path / "run"
    code = (
        f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); sys.path.insert(0, {str(TESTS_DIR)!r});"
        "from conftest import ToyVAE; from test_checkpoint import train;"
        f"train(ToyVAE, {str(run_dir)!r}, 4, die_while_saving=3)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in run_dir.iterdir())
    assert names[1:] == [f"checkpoint-00000000{s}.pt" for s in (1, 2)]
    assert names[0].startswith(".checkpoint-000000003.pt.") and names[0].endswith(".tmp")  # the half-written file
    assert latest_checkpoint(run_dir) == checkpoint_path(run_dir, 2)
    set_seed(999)
    resumed = train(toy_vae, run_dir, 4)
    _assert_same_state(resumed, train(toy_vae, tmp_path / "ref", 4))


def test_atomic_path_gives_the_permissions_of_a_plain_write_and_keeps_an_existing_files(tmp_path):
    from pyro_vmm.utils import atomic_path

    (tmp_path / "plain").write_text("x")
    plain_mode = (tmp_path / "plain").stat().st_mode & 0o777
    new = tmp_path / "new.json"
    with atomic_path(new) as tmp:
        assert tmp.stat().st_mode & 0o777 == 0o600  # the temporary file is private while it is being written
        tmp.write_text("{}")
    assert new.read_text() == "{}" and new.stat().st_mode & 0o777 == plain_mode

    kept = tmp_path / "kept.json"
    kept.write_text("old")
    os.chmod(kept, 0o640)
    with atomic_path(kept) as tmp:
        tmp.write_text("new")
    assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o640

    with pytest.raises(RuntimeError), atomic_path(kept) as tmp:  # a failed write leaves the old file as it was
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert kept.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "new.json", "plain"]
