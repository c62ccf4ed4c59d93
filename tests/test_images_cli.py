"""`pyro-vmm images` and `pyro-vmm images-sweep` end to end on the embedded digits, with tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

from pyro_vmm.cli import main

TINY = ["--dataset", "digits", "--subset", "240", "--hidden", "16,16,32", "--latent-dim", "3", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("prior", ["vmm", "vade"])
def test_images_end_to_end(prior, tmp_path, capsys):
    out = tmp_path / prior
    code = main(["images", "--prior", prior, *TINY, "--epochs", "2", "--n-clusters", "8", "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"metrics.json", "model.pt", "prior_samples.png", "training.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    scores = metrics["scores"]
    assert 1 <= scores["utilized_clusters"] <= 8 and 0.0 <= scores["nmi_unmerged"] <= 1.0
    assert metrics["n_evaluated"] == 240 and metrics["n_train"] + metrics["n_validation"] == 240
    assert metrics["settings"]["prior"] == prior and metrics["history"]["epochs_run"] == 2
    assert metrics["environment"]["command"].startswith("pyro-vmm")
    saved = torch.load(out / "model.pt", weights_only=False)
    assert saved["config"]["n_latent"] == 3 and any(k.startswith("prior.") for k in saved["state_dict"])
    assert (out / "prior_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "utilized clusters" in capsys.readouterr().out


@pytest.mark.parametrize("prior", ["vmm", "vade"])
def test_images_monitor_nmi_records_the_criterion(prior, tmp_path):
    out = tmp_path / prior
    args = ["images", "--prior", prior, *TINY, "--epochs", "3", "--n-clusters", "8", "--monitor", "nmi"]
    assert main([*args, "--out", str(out)]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history["monitor"] == "nmi" and len(history["val_nmi"]) == 3
    assert history["best_epoch"] == max(range(3), key=history["val_nmi"].__getitem__)


def test_saved_model_reloads_and_reproduces_its_scores(tmp_path):
    from pyro_vmm.images.evaluation import evaluate_clustering
    from pyro_vmm.images.experiment import build_model, load_split

    main(["images", "--prior", "gmm", *TINY, "--epochs", "1", "--n-clusters", "5", "--out", str(tmp_path)])
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    train, val = load_split("digits", None, 240, 0)
    model = build_model(saved["settings"], train.x)
    model.load_state_dict(saved["state_dict"])
    scores = evaluate_clustering(model, torch.cat([train.x, val.x]), torch.cat([train.labels, val.labels]), seed=0)
    assert scores.to_dict() == json.loads((tmp_path / "metrics.json").read_text())["scores"]


def test_images_sweep_end_to_end(tmp_path):
    code = main(
        ["images-sweep", *TINY, "--batch-sizes", "32,64", "--epochs", "1", "--n-clusters", "6", "--out", str(tmp_path)]
    )
    assert code == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["batch_size"] for r in sweep["runs"]] == [32, 64]
    assert set(sweep["mean_by_batch_size"]) == {"32", "64"}
    assert sweep["best_batch_size_by_nmi"] in (32, 64)
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    args = ["images", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-download", "--out", str(tmp_path / "o")]
    code = main(args)
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and "not found" in err and "Traceback" not in err
    assert main(["images", *TINY, "--epochs", "0", "--out", str(tmp_path / "o")]) == 2
    assert main(["images", *TINY, "--n-clusters", "0", "--out", str(tmp_path / "o")]) == 2
    assert main(["images-sweep", *TINY, "--n-seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert main(["images", "--prior", "normal", *TINY, "--monitor", "nmi", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()  # nothing is written when the run fails
