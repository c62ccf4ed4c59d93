"""Print, as Markdown, the error each bad input gets (the list in docs/RESULTS.md, issue 7).

Run from the repository root:  python docs/bad_inputs_report.py
The setup_anndata cases are those of tests/test_validation.py; the rest go through the public API and the CLI.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")

from test_validation import ANNDATA_CASES, _adata  # noqa: E402

from pyro_vmm import VMMSCVI  # noqa: E402


def show(name: str, fn) -> None:
    try:
        fn()
        print(f"- **{name}**: no error")
    except Exception as err:  # noqa: BLE001 -- reporting every error is the point
        print(f"- **{name}** → `{type(err).__name__}`: {str(err).splitlines()[0][:400]}")


def main() -> None:
    for case in sorted(ANNDATA_CASES):
        make, kwargs, _ = ANNDATA_CASES[case]
        show(f"setup_anndata: {case}", lambda make=make, kwargs=kwargs: VMMSCVI.setup_anndata(make(), **kwargs))
    adata = _adata()
    VMMSCVI.setup_anndata(adata, batch_key="batch")
    show("K < 1 (n_clusters=0)", lambda: VMMSCVI(adata, n_clusters=0))
    show("latent dim < 1 (n_latent=0)", lambda: VMMSCVI(adata, n_latent=0))
    show("unknown prior", lambda: VMMSCVI(adata, prior="dirichlet"))
    model = VMMSCVI(adata, n_clusters=4, n_latent=2, n_hidden=8, seed=0)
    model.train(max_epochs=1, batch_size=10, enable_progress_bar=False, early_stopping=False, seed=0)
    show("lr = 0", lambda: model.train(max_epochs=1, lr=0, enable_progress_bar=False))
    show("DDP without a seed",
         lambda: model.train(max_epochs=1, devices=2, accelerator="cpu", strategy="ddp", enable_progress_bar=False))
    show("query with the genes in another order", lambda: model.get_latent_representation(_adata()[:, ::-1].copy()))
    show("query with fewer genes", lambda: model.get_latent_representation(_adata(g=6)))
    query = _adata()
    query.obs["batch"] = query.obs["batch"].astype(str).replace({"a": "c"}).astype("category")
    show("query with a batch the model was not trained on", lambda: model.get_latent_representation(query))
    show("load_query_data with no new batch", lambda: VMMSCVI.load_query_data(_adata(), model))
    one_batch = _adata()
    VMMSCVI.setup_anndata(one_batch)
    plain = VMMSCVI(one_batch, n_clusters=4, n_latent=2, n_hidden=8, seed=0)
    plain.train(max_epochs=1, batch_size=10, enable_progress_bar=False, early_stopping=False, seed=0)
    show("load_query_data on a reference without a batch_key", lambda: VMMSCVI.load_query_data(query.copy(), plain))
    query = _adata()
    del query.obs["batch"]
    show("query without the batch column", lambda: model.get_latent_representation(query))
    query = _adata()
    query.X = query.X.log1p()
    show("query with log-normalised values", lambda: model.get_latent_representation(query))
    show("DE: groupby typo", lambda: model.differential_expression(groupby="celltype"))
    show("expression in an unknown batch", lambda: model.get_normalized_expression(transform_batch="b9"))
    show("expression of unknown genes", lambda: model.get_normalized_expression(gene_list=["NOT_A_GENE"]))
    folder = Path(tempfile.mkdtemp())
    model.save(str(folder / "model"), overwrite=True)
    other = _adata(g=6)
    VMMSCVI.setup_anndata(other, batch_key="batch")
    show("load onto an AnnData with other genes", lambda: VMMSCVI.load(str(folder / "model"), adata=other))
    (folder / "model" / "model.pt").write_bytes(b"garbage")
    show("load a corrupted model.pt", lambda: VMMSCVI.load(str(folder / "model"), adata=adata))
    torch.save({"hello": 1}, folder / "model" / "model.pt")
    show("load a foreign model.pt", lambda: VMMSCVI.load(str(folder / "model"), adata=adata))
    ckpt = folder / "ckpt"
    model.train(max_epochs=1, batch_size=10, enable_progress_bar=False, early_stopping=False, seed=0,
                checkpoint_dir=str(ckpt))
    newest = sorted(ckpt.iterdir())[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    show("resume from a truncated checkpoint",
         lambda: VMMSCVI(adata, n_clusters=4, n_latent=2, n_hidden=8, seed=0).train(
             max_epochs=2, batch_size=10, enable_progress_bar=False, early_stopping=False, seed=0,
             checkpoint_dir=str(ckpt)))
    runs = [
        ["scrna", "--data", "missing.h5ad"],
        ["scrna", "--data", "../shared/data/scrna/kang_ifnb_2800.h5ad", "--batch-key", "Batch"],
        ["map", "--reference", str(folder), "--data", "../shared/data/scrna/kang_ifnb_2800.h5ad"],
        ["images", "--dataset", "digits", "--n-clusters", "0"],
        ["images", "--dataset", "mnist", "--data-dir", str(folder), "--no-download"],
    ]
    for args in runs:
        out = folder / "out"
        proc = subprocess.run([sys.executable, "-m", "pyro_vmm", *args, "--out", str(out)], capture_output=True,
                              text=True)
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:]
        print(f"- **`pyro-vmm {' '.join(a if not a.startswith(str(folder)) else 'DIR' for a in args)}`** → exit "
              f"{proc.returncode}: {last[0][:400] if last else ''} (output folder written: {out.exists()})")


if __name__ == "__main__":
    main()
