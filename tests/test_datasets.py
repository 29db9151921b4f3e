"""Training datasets: barcode join, patch streaming, augmentation rule, validation splits and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from cmrcnet.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochSampler,
    SpotDataset,
    apply_dihedral,
    augmentation_code,
    dihedral_positions,
    load_fold,
)
from cmrcnet.errors import CMRCNetError

GENES = [f"G{i}" for i in range(8)]
ROWS, COLS = 5, 8  # 40 spots per sample on a small grid


def write_dataset(root: Path, n_samples: int = 3, patch_px: int = 32, seed: int = 0, drop_patches: int = 0,
                  extra_patches: int = 0) -> Path:
    """A processed dataset in the pipeline's layout whose patch colour predicts expression.

    Each spot has a latent z in [0, 1]^3; expression is a fixed positive mix of z (plus a little noise) and the
    patch colour is z, with a dark square in one corner so flips and rotations are visible. Patch files are
    written in shuffled order so the loader has to join by barcode.
    """
    rng = np.random.default_rng(seed)
    mix = rng.uniform(0.2, 1.5, size=(3, len(GENES)))
    samples = [f"S{i}" for i in range(n_samples)]
    (root / "st").mkdir(parents=True, exist_ok=True)
    (root / "patches").mkdir(exist_ok=True)
    for s in samples:
        n = ROWS * COLS
        z = rng.uniform(0, 1, size=(n, 3))
        expr = np.clip(z @ mix + rng.normal(0, 0.05, (n, len(GENES))), 0, None).astype(np.float32)
        obs = pd.DataFrame({"array_row": np.arange(n) // COLS, "array_col": np.arange(n) % COLS},
                           index=[f"{s}-{i}" for i in range(n)])
        ad.AnnData(X=sp.csr_matrix(expr), obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(root / "st" / f"{s}.h5ad")

        colour = (30 + 200 * z).astype(np.int16)[:, None, None, :]
        img = np.clip(colour + rng.integers(-8, 9, size=(n, patch_px, patch_px, 3)), 0, 255).astype(np.uint8)
        img[:, : patch_px // 4, : patch_px // 4] = 0
        barcodes = list(obs.index)
        keep = rng.permutation(n)[: n - drop_patches]
        img, barcodes = img[keep], [barcodes[i] for i in keep]
        if extra_patches:
            img = np.concatenate([img, img[:extra_patches]])
            barcodes += [f"{s}-extra{i}" for i in range(extra_patches)]
        write_patches(root / "patches" / f"{s}.h5", img, barcodes)
    rows = [{"fold": f, "sample": s, "role": "test" if s == t else "train", "patient": s}
            for f, t in enumerate(samples) for s in samples]
    pd.DataFrame(rows).to_csv(root / "folds.tsv", sep="\t", index=False)
    pd.DataFrame({"gene": GENES}).to_csv(root / "genes.tsv", sep="\t", index=False)
    return root


def write_patches(path: Path, img: np.ndarray, barcodes: list[str]) -> None:
    n, px = img.shape[0], img.shape[1]
    with h5py.File(path, "w") as h5:
        h5.create_dataset("img", data=img, chunks=(1, px, px, 3))
        h5.create_dataset("barcode", data=np.array([b.encode() for b in barcodes]).reshape(n, 1))
        h5.create_dataset("coords", data=np.zeros((n, 2), dtype=np.int64))
        h5.attrs.update({"um_per_px": 0.5, "patch_size_px": px})  # as extract_patches writes them


def build_synthetic_processed(root: Path, patch_px: int, um_per_px: float) -> tuple[Path, Path]:
    """Three synthetic Visium samples (A, B, C) taken through the real stages: genes, normalisation, patches,
    leave-one-sample-out folds. Returns (raw, processed) folders."""
    from cmrcnet.data.folds import write_folds
    from cmrcnet.data.genes import normalise_sample, select_genes
    from cmrcnet.data.patches import extract_patches
    from cmrcnet.data.synthetic import synthesize_sample

    raw, proc = root / "raw", root / "processed"
    samples = ["A", "B", "C"]
    for i, s in enumerate(samples):
        synthesize_sample(raw, s, technology="visium", sample_index=i, seed=3, patient=s, width_um=1000,
                          height_um=1000, n_genes=200)
    st = {s: raw / "st" / f"{s}.h5ad" for s in samples}
    select_genes(st, proc / "genes.tsv", method="hvg_union", dataset="syn", n_top_hvg=20)
    for s in samples:
        normalise_sample(st[s], proc / "genes.tsv", proc / "st" / f"{s}.h5ad", sample=s, dataset="syn")
        extract_patches(raw / "wsis" / f"{s}.tif", st[s], raw / "metadata" / f"{s}.json", proc / "patches" / f"{s}.h5",
                        proc / "patches" / f"{s}.parquet", sample=s, patch_px=patch_px, um_per_px=um_per_px,
                        progress=False)
    write_folds({s: raw / "metadata" / f"{s}.json" for s in samples}, proc / "folds.tsv",
                scheme="leave_one_sample_out", dataset="syn")
    return raw, proc


@pytest.fixture
def dataset_dir(tmp_path):
    return write_dataset(tmp_path / "ds")


def unnormalise(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def test_spot_items_have_model_shapes_and_imagenet_normalisation(dataset_dir):
    fold = load_fold(dataset_dir, 0)
    assert fold.train_samples == ["S1", "S2"] and fold.test_samples == ["S0"] and fold.genes == GENES
    ds = fold.spot_dataset(fold.all_spots(["S1"]), input_size=32)
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["expr"].shape == (8,) and item["expr"].dtype == torch.float32 and item["index"] == 3
    spots = fold.sample("S1")
    with h5py.File(spots.patch_path) as h5:
        patch = h5["img"][spots.patch_rows[3]]
    np.testing.assert_allclose(unnormalise(item["image"]), patch, atol=1e-3)
    st = ad.read_h5ad(spots.st_path)
    np.testing.assert_allclose(item["expr"].numpy(), st[spots.barcodes[3]].X.toarray()[0])


@pytest.mark.parametrize("size", [16, 48])
def test_patches_of_any_size_are_resized_to_the_model_input(dataset_dir, size):
    fold = load_fold(dataset_dir, 0)
    ds = fold.spot_dataset(fold.all_spots(["S1"]), input_size=size)
    image = ds[0]["image"]
    assert image.shape == (3, size, size)
    # the patch colour survives resizing: the mean of the image matches the mean of the stored patch
    spots = fold.sample("S1")
    with h5py.File(spots.patch_path) as h5:
        patch = h5["img"][spots.patch_rows[0]].astype(float)
    np.testing.assert_allclose(unnormalise(image).mean((0, 1)), patch.mean((0, 1)), atol=2.0)


def test_join_by_barcode_with_shuffled_and_partial_patch_files(tmp_path, caplog):
    root = write_dataset(tmp_path / "ds", drop_patches=3, extra_patches=2)
    with caplog.at_level(logging.INFO, logger="cmrcnet"):
        fold = load_fold(root, 0)
    assert "37 spots joined; 3 spots without a patch and 2 patches without expression" in caplog.text
    spots = fold.sample("S1")
    assert len(spots.barcodes) == 37
    with h5py.File(spots.patch_path) as h5:
        h5_barcodes = [b.decode() for b in h5["barcode"][:, 0]]
    assert [h5_barcodes[r] for r in spots.patch_rows] == list(spots.barcodes)
    assert list(spots.patch_rows) != sorted(spots.patch_rows)  # the file order really was shuffled
    st = ad.read_h5ad(spots.st_path)
    np.testing.assert_allclose(spots.expression, st[list(spots.barcodes)].X.toarray())
    assert (spots.pos == st[list(spots.barcodes)].obs[["array_row", "array_col"]].to_numpy()).all()


def test_augmentation_is_fixed_by_seed_epoch_and_index_and_varies(dataset_dir):
    fold = load_fold(dataset_dir, 0)
    part = fold.all_spots(["S1"])
    a = fold.spot_dataset(part, 32, augment=True, seed=5)
    b = fold.spot_dataset(part, 32, augment=True, seed=5)
    plain = fold.spot_dataset(part, 32, augment=False)
    for index in range(5):
        for epoch in range(3):
            a.set_epoch(epoch)
            assert torch.equal(a[index]["image"], b[(epoch, index)]["image"])
            expected = apply_dihedral(plain[index]["image"], augmentation_code(5, epoch, index))
            assert torch.equal(a[index]["image"], expected)
    codes = {augmentation_code(5, e, 0) for e in range(20)}
    assert len(codes) > 3  # different epochs see different flips/rotations
    assert {augmentation_code(5, 0, i) for i in range(20)} != {0}
    # the 8 transforms are distinct on an asymmetric patch
    image = plain[0]["image"]
    assert len({apply_dihedral(image, c).numpy().tobytes() for c in range(8)}) == 8
    assert torch.equal(apply_dihedral(image, 0), image)


def test_batches_do_not_depend_on_worker_count(dataset_dir):
    fold = load_fold(dataset_dir, 0)
    ds = fold.spot_dataset(fold.all_spots(["S1", "S2"]), 16, augment=True, seed=1)

    def batches(workers):
        sampler = EpochSampler(len(ds), seed=1)
        loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
        out = []
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            out.append([(b["image"], b["index"]) for b in loader])
        return out

    serial, parallel = batches(0), batches(2)
    for e in range(2):
        for (img_a, idx_a), (img_b, idx_b) in zip(serial[e], parallel[e]):
            assert torch.equal(idx_a, idx_b) and torch.equal(img_a, img_b)
    assert not torch.equal(serial[0][0][1], serial[1][0][1])  # a new order each epoch


def test_sampler_order_and_limit():
    s = EpochSampler(10, seed=3, limit=4)
    s.set_epoch(2)
    first = list(s)
    assert len(first) == 4 == len(s) and all(e == 2 for e, _ in first)
    assert first == list(s)
    assert [i for _, i in EpochSampler(5, seed=3, shuffle=False)] == [0, 1, 2, 3, 4]


def test_dihedral_positions_follow_the_image():
    # a slide whose "pixels" are spot ids: moving positions must match moving the picture
    rows, cols = 3, 5
    grid = torch.arange(rows * cols).view(rows, cols)
    pos = np.array([(r, c) for r in range(rows) for c in range(cols)])
    for code in range(8):
        moved = apply_dihedral(grid, code)
        new_pos = dihedral_positions(pos, code)
        assert (new_pos >= 0).all()
        assert [int(moved[r, c]) for r, c in new_pos] == list(range(rows * cols))


def test_slide_items_hold_whole_samples(dataset_dir):
    fold = load_fold(dataset_dir, 0)
    ds = fold.slide_dataset(fold.all_spots(fold.train_samples), input_size=16, augment=True, seed=0)
    assert len(ds) == 2
    item = ds[(1, 0)]
    assert item["image"].shape == (40, 3, 16, 16) and item["pos"].dtype == torch.int64
    assert item["pos"].shape == (40, 2) and item["expr"].shape == (40, 8)
    plain = fold.slide_dataset(fold.all_spots(fold.train_samples), input_size=16)[0]
    code = augmentation_code(0, 1, 0)
    assert torch.equal(item["image"], apply_dihedral(plain["image"], code))
    assert torch.equal(item["expr"], plain["expr"])
    assert fold.n_pos() == COLS  # largest grid index + 1 over rows and columns


def test_validation_split_by_spot(dataset_dir):
    fold = load_fold(dataset_dir, 1)
    train, val = fold.split("spot", 0.25, seed=0)
    n_train, n_val = sum(map(len, train.values())), sum(map(len, val.values()))
    assert n_val == 20 and n_train == 60
    for s in fold.train_samples:
        assert not set(train[s]) & set(val[s])
        assert sorted(set(train[s]) | set(val[s])) == list(range(40))
    again, _ = fold.split("spot", 0.25, seed=0)
    other, _ = fold.split("spot", 0.25, seed=1)
    assert all((again[s] == train[s]).all() for s in train)
    assert any(len(other[s]) != len(train[s]) or (other[s] != train[s]).any() for s in train)


def test_validation_split_by_sample(dataset_dir, tmp_path):
    fold = load_fold(dataset_dir, 1)
    train, val = fold.split("sample")
    assert list(train) == ["S0"] and list(val) == ["S2"] and len(val["S2"]) == 40
    two = load_fold(write_dataset(tmp_path / "two", n_samples=2), 0)
    with pytest.raises(CMRCNetError, match="val_split: 'sample' needs 2 or more training samples"):
        two.split("sample")
    with pytest.raises(CMRCNetError, match="val_split"):
        two.split("patient")


def test_missing_or_empty_fold_names_folds_tsv(dataset_dir):
    with pytest.raises(CMRCNetError, match=r"folds\.tsv: no fold 7"):
        load_fold(dataset_dir, 7)
    folds = pd.read_csv(dataset_dir / "folds.tsv", sep="\t")
    folds.loc[folds["fold"] == 0, "role"] = "test"
    folds.to_csv(dataset_dir / "folds.tsv", sep="\t", index=False)
    with pytest.raises(CMRCNetError, match=r"folds\.tsv: fold 0 is empty"):
        load_fold(dataset_dir, 0)


def test_gene_order_that_differs_from_genes_tsv_names_the_h5ad(dataset_dir):
    path = dataset_dir / "st" / "S2.h5ad"
    adata = ad.read_h5ad(path)
    adata[:, GENES[::-1]].copy().write_h5ad(path)
    with pytest.raises(CMRCNetError, match=r"S2\.h5ad: genes differ from .*genes\.tsv \(position 0"):
        load_fold(dataset_dir, 0)
    adata[:, GENES[:5]].copy().write_h5ad(path)
    with pytest.raises(CMRCNetError, match=r"S2\.h5ad: 5 genes"):
        load_fold(dataset_dir, 0)


@pytest.mark.parametrize("damage", ["not_hdf5", "no_img", "no_barcode", "wrong_shape", "missing"])
def test_corrupt_patch_file_names_the_h5(dataset_dir, damage):
    path = dataset_dir / "patches" / "S1.h5"
    if damage == "not_hdf5":
        path.write_text("this is not HDF5\n")
    elif damage == "missing":
        path.unlink()
    else:
        with h5py.File(path, "a") as h5:
            if damage == "no_img":
                del h5["img"]
            elif damage == "no_barcode":
                del h5["barcode"]
            else:
                del h5["img"]
                h5.create_dataset("img", data=np.zeros((40, 8, 8), dtype=np.uint8))
    with pytest.raises(CMRCNetError, match=r"patches/S1\.h5: "):
        load_fold(dataset_dir, 0)


def test_corrupt_or_missing_h5ad_names_it(dataset_dir):
    path = dataset_dir / "st" / "S1.h5ad"
    path.write_bytes(b"not an h5ad")
    with pytest.raises(CMRCNetError, match=r"S1\.h5ad: cannot read as AnnData"):
        load_fold(dataset_dir, 0)
    path.unlink()
    with pytest.raises(CMRCNetError, match=r"S1\.h5ad: expression file \(\.h5ad\) not found"):
        load_fold(dataset_dir, 0)


def test_no_barcode_in_common_is_an_error(dataset_dir):
    path = dataset_dir / "patches" / "S1.h5"
    with h5py.File(path, "a") as h5:
        n = h5["barcode"].shape[0]
        del h5["barcode"]
        h5.create_dataset("barcode", data=np.array([f"x{i}".encode() for i in range(n)]).reshape(n, 1))
    with pytest.raises(CMRCNetError, match=r"S1\.h5: no barcode in common with .*S1\.h5ad"):
        load_fold(dataset_dir, 0)


def test_spot_dataset_pickles_without_open_files(dataset_dir):
    import pickle

    fold = load_fold(dataset_dir, 0)
    ds = fold.spot_dataset(fold.all_spots(["S1"]), 32)
    first = ds[0]["image"]
    copy = pickle.loads(pickle.dumps(ds))  # as a spawned worker receives it
    assert torch.equal(copy[0]["image"], first)
    ds.close()
    assert isinstance(ds, SpotDataset)
