"""The README's Python example runs and does what it says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if marker in b]
    assert len(blocks) == 1, f"README should have one python example with {marker!r}"
    return blocks[0]


def test_readme_python_example_runs_and_finds_three_clusters():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_block("class TinyVAE"), str(README), "exec"), {"__name__": "readme"})
    assert "utilized clusters: 3" in out.getvalue()


def test_readme_vmmscvi_example_runs(tmp_path, monkeypatch, shared_data):
    """The VMM-scVI example as written, with 2 epochs and K = 10 instead of the defaults (400 epochs, K = 30)."""
    code = _block("pyro_vmm.VMMSCVI.setup_anndata")
    for old, new in (("model.train(seed=0)", "model.train(max_epochs=2, seed=0)"),
                     ("VMMSCVI(adata, seed=0)", "VMMSCVI(adata, n_clusters=10, seed=0)")):
        assert old in code
        code = code.replace(old, new)
    code = code.replace("../shared/data", str(shared_data))
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), scope)
    adata, markers, de = scope["adata"], scope["markers"], scope["de"]
    assert adata.obsm["X_vmm"].shape == (adata.n_obs, 10) and scope["probs"].shape == (adata.n_obs, 10)
    assert scope["expr"].shape == adata.shape and {"cluster", "gene", "lfc_mean"} <= set(markers.columns)
    assert np.isfinite(scope["log_px"]) and scope["log_px"] < 0  # a log-probability of counts
    assert "lfc_mean" in de.columns and (tmp_path / "runs" / "my_model" / "model.pt").is_file()


MAIN_JOB = ("pyro-vmm scrna --data ../shared/data/scrna/kang_ifnb_2800.h5ad --batch-key batch --labels-key cell_type "
            "--out runs/kang")


def _make_n(*args: str) -> list[str]:
    """The commands ``make -n ARGS`` would run in the repository root (nothing is run)."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "-C", str(README.parent), *args], capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if not line.startswith("make")]


def test_readme_quick_start_is_two_make_commands_that_ci_runs():
    text = README.read_text()
    quick = text[text.index("## Quick start"):]
    two_commands = r"```bash\nmake demo[^\n]*\n(#[^\n]*\n)*make test[^\n]*\n```"
    assert re.search(two_commands, quick), "the quick start should be make demo, then make test"
    assert "python -m pytest -n 2 -q" in text and MAIN_JOB in text  # the manual route, documented below
    ci = (README.parent / ".ci" / "run").read_text()
    assert re.search(r"^exec make test\b", ci, re.M)


def test_make_demo_and_test_install_once_then_reuse_the_environment(tmp_path):
    import os

    venv = tmp_path / "venv"
    fresh = "\n".join(_make_n("-B", "demo", f"VENV={venv}"))  # -B: as on a fresh clone
    assert f"python3 -m venv {venv}" in fresh
    installs = [line for line in fresh.splitlines() if "pip install" in line]
    assert len(installs) == 2 and 'pip install -q torch==2.13.0 -e ".[test]"' in installs[0]
    assert "pip install -q --no-deps pymde==0.3.0" in installs[1]
    assert 'python -c "import scvi, pyro_vmm._compat as c; c.import_pymde()"' in fresh
    assert f"{venv}/bin/{MAIN_JOB}" in fresh
    assert f"{venv}/bin/python -m pytest -n 2 -q" in "\n".join(_make_n("-B", "test", f"VENV={venv}"))

    venv.mkdir()
    stamp = venv / ".installed"
    stamp.touch()  # installed after the last change of pyproject.toml: reused
    assert _make_n("test", f"VENV={venv}") == [f"MPLBACKEND=Agg PYTHONHASHSEED=0 {venv}/bin/python -m pytest -n 2 -q"]
    os.utime(stamp, (0, 0))  # pyproject.toml changed since: installed again
    assert any("pip install" in line for line in _make_n("test", f"VENV={venv}"))


def test_readme_backed_example_runs_without_loading_the_matrix(tmp_path, monkeypatch, shared_data):
    """The larger-than-memory example as written, on a small real file, with 1 epoch and K = 10."""
    import anndata

    from _data import kang_subset

    code = _block('backed="r"')
    for old, new in (("max_epochs=10", "max_epochs=1"), ("(adata, seed=0)", "(adata, n_clusters=10, seed=0)")):
        assert old in code
        code = code.replace(old, new)
    kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad").write_h5ad(tmp_path / "atlas.h5ad")
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the backed matrix was loaded into memory")

    probe = anndata.read_h5ad(tmp_path / "atlas.h5ad", backed="r")
    monkeypatch.setattr(type(probe.X), "to_memory", refuse)  # the class of a backed CSR matrix
    probe.file.close()
    scope = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["adata"].isbacked and scope["z"].shape == (scope["adata"].n_obs, 10)
    scope["adata"].file.close()
