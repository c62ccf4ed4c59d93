"""The scRNA benchmark's merge of result files: runs combined, and per-epoch times judged only within one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
scrna_benchmark = pytest.importorskip("scrna_benchmark")


def _row(model: str, seed: int, s_per_epoch: float, total: float) -> dict:
    return {"dataset": "kang_ifnb_2800", "model": model, "seed": seed, "n_labels": 13, "s_per_epoch": s_per_epoch,
            "cpu_s_per_epoch": s_per_epoch, "Total": total, "Bio conservation": total - 0.1}


def _part(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps({"benchmark": "scrna_benchmark", "command": f"python make {path.name}",
                                "note": "test", "wall_s": 1.0, "runs": rows}))
    return str(path)


def _epoch_check(payload: dict) -> dict:
    return next(c for c in payload["checks"] if "per-epoch" in c["check"])


def test_merged_files_are_not_a_timing_comparison(tmp_path, capsys):
    vmm = _part(tmp_path / "vmm.json", [_row("VMM-scVI", s, 0.5, 0.75) for s in (0, 1)])
    scvi = _part(tmp_path / "scvi.json", [_row("SCVI", s, 1.0, 0.74) for s in (0, 1)])
    out = tmp_path / "merged.json"
    assert scrna_benchmark.merge([vmm, scvi], out) == 0
    payload = json.loads(out.read_text())
    assert len(payload["runs"]) == 4 and payload["merged_from"] == [vmm, scvi]
    assert {r["source"] for r in payload["runs"]} == {vmm, scvi}
    epoch = _epoch_check(payload)
    assert epoch["holds"] is None and "different processes" in epoch["check"]
    total = next(c for c in payload["checks"] if "scIB Total" in c["check"])
    assert total["holds"] is True  # quality numbers do not depend on the process: still judged
    assert "[n/a]" in capsys.readouterr().out


def test_one_file_is_a_timing_comparison(tmp_path):
    both = _part(tmp_path / "both.json", [_row("VMM-scVI", 0, 1.2, 0.75), _row("SCVI", 0, 1.0, 0.74)])
    out = tmp_path / "merged.json"
    scrna_benchmark.merge([both], out)
    epoch = _epoch_check(json.loads(out.read_text()))
    assert epoch["holds"] is False and "different processes" not in epoch["check"]
    # a merge of merges keeps each run's first source
    again = tmp_path / "again.json"
    scrna_benchmark.merge([str(out)], again)
    assert {r["source"] for r in json.loads(again.read_text())["runs"]} == {both}


def test_tuning_merge_selects_by_another_column_among_eligible_settings(tmp_path):
    scrna_tuning = pytest.importorskip("scrna_tuning")

    def run(batch_size, plr, clusters, nmi, total):
        return {"batch_size": batch_size, "prior_lr_ratio": plr, "seed": 100, "utilized_clusters": clusters,
                "nmi_unmerged": nmi, "Total": total, "wall_s": 1.0}

    runs = [run(128, 1.0, 20, 0.70, 0.75), run(256, 2.5, 15, 0.73, 0.70), run(512, 5.0, 5, 0.90, 0.60)]
    entry = {"epochs": 100, "settings": {"steps": 2000}, "n_labels": 13, "score": "Total", "runs": runs}
    part = tmp_path / "sweep.json"
    part.write_text(json.dumps({"benchmark": "scrna_tuning", "command": "python x", "datasets": {"kang": entry}}))
    by_total, by_nmi = tmp_path / "total.json", tmp_path / "nmi.json"
    assert scrna_tuning.merge([str(part)], by_total) == 0
    assert scrna_tuning.merge([str(part)], by_nmi, select_by="nmi_unmerged") == 0
    assert json.loads(by_total.read_text())["datasets"]["kang"]["selected"]["batch_size"] == 128
    # 512 has the best NMI but too few clusters (5 < 13 cell types): the eligible best by NMI is 256
    selected = json.loads(by_nmi.read_text())["datasets"]["kang"]["selected"]
    assert selected == {"batch_size": 256, "prior_lr_ratio": 2.5, "nmi_unmerged": pytest.approx(0.73)}
    # a merged file merges again with a new part: the runs add up and the commands are kept in order
    extra = tmp_path / "extra.json"
    entry2 = {**entry, "runs": [run(256, 2.4, 13, 0.76, 0.71)], "command": "python y"}
    extra.write_text(json.dumps({"benchmark": "scrna_tuning", "datasets": {"kang": entry2}}))
    again = tmp_path / "again.json"
    assert scrna_tuning.merge([str(by_total), str(extra)], again, select_by="nmi_unmerged") == 0
    kang = json.loads(again.read_text())["datasets"]["kang"]
    assert len(kang["runs"]) == 4 and kang["commands"] == ["python x", "python y"]
    assert kang["selected"]["prior_lr_ratio"] == pytest.approx(2.4)


def _defaults_run(methods: dict) -> dict:
    scores = {"clusters": 3, "nmi": 0.9, "ari": 0.9, "Batch correction": 0.9, "Bio conservation": 0.8}
    return {"data": "cellbench_3cl", "seed": 0, "n_labels": 3, "n_batches": 2, "n_cells": 499,
            "methods": {m: {**scores, "train_s": t, "Total": total} for m, (t, total) in methods.items()}}


def test_defaults_merge_joins_arms_of_one_run_and_does_not_judge_their_times(tmp_path):
    """``benchmarks/defaults.py --merge``: an ablation's VMM arm (``--no-scvi``) joined to another file's SCVI arm
    of the same data set and seed replaces the VMM arm; the train-time check is then not judged."""
    defaults = pytest.importorskip("defaults")
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"command": "full", "runs": [_defaults_run({"VMM": (50, 0.84), "SCVI": (60, 0.83)})]}))
    ablation = tmp_path / "ablation.json"
    ablation.write_text(json.dumps({"command": "ablation", "runs": [_defaults_run({"VMM": (40, 0.86)})]}))
    out = tmp_path / "joined.json"
    assert defaults.main(["--merge", str(full), str(ablation), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    (run,) = payload["runs"]
    assert run["methods"]["VMM"]["Total"] == 0.86 and run["methods"]["SCVI"]["Total"] == 0.83
    checks = {c["check"]: c["holds"] for c in payload["acceptance"]}
    timing = [c for c in checks if "train" in c]
    assert len(timing) == 1 and checks[timing[0]] is None and "not judged" in timing[0]
    assert checks["cellbench_3cl: scIB Total 0.860 >= SCVI 0.830 + 0.01"] is True
    assert defaults.main(["--merge", str(full), "--out", str(out)]) == 0  # one file: the times are judged
    judged = json.loads(out.read_text())["acceptance"]
    assert any("train 50 s <= SCVI 60 s" in c["check"] and c["holds"] for c in judged)
