"""Shared fixtures: small AnnData and HEST-layout samples the project builds itself."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def make_counts_adata(n_spots=60, genes=("A", "B", "C", "D"), seed=0, in_tissue=None, with_spatial=True):
    """Raw integer counts with spot coordinates; gene i has mean 2*(i+1) so variances differ."""
    rng = np.random.default_rng(seed)
    means = 2.0 * (np.arange(len(genes)) + 1)
    X = rng.poisson(means, size=(n_spots, len(genes))).astype(np.int32)
    obs = pd.DataFrame(index=[f"s{i}" for i in range(n_spots)])
    obs["in_tissue"] = np.ones(n_spots, int) if in_tissue is None else in_tissue
    obs["array_row"] = np.arange(n_spots) // 10
    obs["array_col"] = np.arange(n_spots) % 10
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=list(genes)))
    if with_spatial:
        adata.obsm["spatial"] = np.stack([obs["array_col"] * 100 + 50, obs["array_row"] * 100 + 50], 1).astype(float)
    return adata


@pytest.fixture
def write_sample(tmp_path):
    """Write a raw .h5ad and a metadata JSON for a sample; returns (st_path, metadata_path)."""

    def _write(name, adata=None, patient="P1", **meta):
        adata = make_counts_adata() if adata is None else adata
        st = tmp_path / "st" / f"{name}.h5ad"
        st.parent.mkdir(exist_ok=True)
        adata.write_h5ad(st)
        md = tmp_path / "metadata" / f"{name}.json"
        md.parent.mkdir(exist_ok=True)
        md.write_text(json.dumps({"patient": patient, "pixel_size_um_estimated": 0.5, **meta}))
        return st, md

    return _write
