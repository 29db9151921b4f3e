"""A tiny fake `MahmoodLab/hest-bench` repo folder with the real layout, from synthetic data.

`write_fake_bench(repo_dir)` writes one task (IDC by default) as the hub has it: `IDC/splits/train_{i}.csv` and
`test_{i}.csv` (sample_id, patches_path, expr_path, paths relative to the task folder), `IDC/patches/{s}.h5`
(HEST patch layout: `img` (N, px, px, 3) uint8, `barcode` (N, 1) bytes, `coords` (N, 2) int64; small patches,
32 px by default, the size of the tiny test encoder), `IDC/patches/vis/{s}.png` (must not be fetched),
`IDC/adata/{s}.h5ad` (raw integer counts; more spots than patches, in another order, and more genes than the task
uses), `IDC/var_50genes.json` (`{"genes": [...]}`, fewer than 50 genes by default) and `IDC/mean_50genes.json`;
plus, to check a fetch takes only its task, another task's gene list and a `fm_v1/` file.

The expression has signal the patches show: each spot has a latent value that sets both the patch's colour and
the Poisson rates of the genes, so a probe on even simple image features scores r > 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

SAMPLES = ("TENX95", "TENX99", "NCBI783", "NCBI785")
# 2 folds, patient-level as HEST's: every sample in exactly one test split
FOLDS = ((("TENX99", "NCBI785"), ("TENX95", "NCBI783")), (("TENX95", "NCBI783"), ("TENX99", "NCBI785")))
GENES = tuple(f"GENE{i:02d}" for i in range(8))


def write_patches(path: Path, barcodes, images: np.ndarray, coords: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = [str(b).encode() for b in barcodes]
    with h5py.File(path, "w") as h5:
        h5.create_dataset("img", data=images.astype(np.uint8))
        h5.create_dataset("barcode", data=np.array(encoded, dtype=f"S{max(map(len, encoded))}").reshape(-1, 1))
        h5.create_dataset("coords", data=coords.astype(np.int64))


def write_split(path: Path, samples) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"sample_id": list(samples), "patches_path": [f"patches/{s}.h5" for s in samples],
                  "expr_path": [f"adata/{s}.h5ad" for s in samples]}).to_csv(path, index=False)


def write_fake_bench(repo_dir: str | Path, task: str = "IDC", *, samples=SAMPLES, folds=FOLDS, genes=GENES,
                     n_spots: int = 24, patch_px: int = 32, extra_genes: int = 3, constant_gene: str | None = None,
                     seed: int = 0) -> dict:
    """Write the fake repo; returns {task_dir, genes, folds, samples: {sample: {barcodes (patch order), counts
    (raw counts of the task's genes, patch order)}}}. `constant_gene` adds a task gene that is 0 in every spot."""
    repo_dir = Path(repo_dir)
    task_dir = repo_dir / task
    rng = np.random.default_rng(seed)
    genes = list(genes) + ([constant_gene] if constant_gene else [])
    all_genes = genes + [f"OTHER{i}" for i in range(extra_genes)]
    out: dict = {"task_dir": task_dir, "genes": list(genes), "folds": folds, "samples": {}}
    for k, sample in enumerate(samples):
        n = n_spots + 2 * k  # samples differ in size
        barcodes = np.array([f"{sample}_{i:03d}x" for i in range(n)])
        latent = rng.uniform(0, 1, n)
        weights = rng.uniform(0.5, 2.0, len(all_genes))
        rates = np.exp(1.0 + np.outer(latent, weights) * 1.5)
        counts = rng.poisson(rates).astype(np.int64)
        counts[:, 0] += rng.poisson(2, n)  # keep every gene varying
        if constant_gene:
            counts[:, len(genes) - 1] = 0
        # patches: colour set by the latent value, plus noise
        base = (60 + 150 * latent)[:, None, None, None]
        images = np.clip(base + rng.normal(0, 12, (n, patch_px, patch_px, 3)), 0, 255).astype(np.uint8)
        images[..., 1] = np.clip(255 - images[..., 1].astype(int), 0, 255)
        coords = np.stack([np.arange(n) * patch_px, np.zeros(n, int)], 1)
        write_patches(task_dir / "patches" / f"{sample}.h5", barcodes, images, coords)
        (task_dir / "patches" / "vis").mkdir(parents=True, exist_ok=True)
        (task_dir / "patches" / "vis" / f"{sample}.png").write_bytes(b"\x89PNG not really\n")
        # expression: two spots without a patch, rows shuffled
        extra = rng.poisson(3, (2, len(all_genes))).astype(np.int64)  # spots without a patch
        X = np.concatenate([counts, extra])
        obs_names = np.concatenate([barcodes, [f"{sample}_nopatch{i}" for i in range(2)]])
        order = rng.permutation(len(obs_names))
        # genes stored in reverse order, so the gene list's order has to be applied
        adata = ad.AnnData(X=sp.csr_matrix(X[order][:, ::-1].astype(np.float32)),
                           obs=pd.DataFrame(index=obs_names[order]), var=pd.DataFrame(index=all_genes[::-1]))
        (task_dir / "adata").mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(task_dir / "adata" / f"{sample}.h5ad")
        out["samples"][sample] = {"barcodes": barcodes, "counts": counts[:, : len(genes)]}
    for i, (train, test) in enumerate(folds):
        write_split(task_dir / "splits" / f"train_{i}.csv", train)
        write_split(task_dir / "splits" / f"test_{i}.csv", test)
    (task_dir / "var_50genes.json").write_text(json.dumps({"genes": list(genes)}))
    (task_dir / "mean_50genes.json").write_text(json.dumps({"genes": list(genes)}))
    other = repo_dir / ("PRAD" if task != "PRAD" else "IDC")
    other.mkdir(parents=True, exist_ok=True)
    (other / "var_50genes.json").write_text(json.dumps({"genes": ["X"]}))
    (repo_dir / "fm_v1" / "ctranspath").mkdir(parents=True, exist_ok=True)
    (repo_dir / "fm_v1" / "ctranspath" / "ctranspath.pth").write_bytes(b"not a checkpoint\n")
    (repo_dir / ".gitattributes").write_text("*.h5 filter=lfs\n")
    return out
