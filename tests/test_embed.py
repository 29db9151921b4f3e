"""The embedding cache: the same numbers as a direct forward through the encoder, in the patch file's order,
whatever the batch size or loader workers; refused inputs name the file and leave nothing behind."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch

from cmrcnet.encoders import get_encoder, load_encoder
from cmrcnet.errors import CMRCNetError
from cmrcnet.inference.embed import embed_patches, read_embeddings, weights_checksum

ENCODER = "tiny-test"  # a timm ViT: 32 px input, 16 dimensions


def write_patch_file(path, n=10, px=32, seed=0, compression=None):
    """A patch file in HEST's layout (as cmrcnet.data.patches writes it), barcodes in a non-sorted order."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(n, px, px, 3), dtype=np.uint8)
    barcodes = [f"spot{(7 * i) % n:03d}-{i}" for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("img", data=img, chunks=(1, px, px, 3), compression=compression)
        h5.create_dataset("barcode", data=np.array([b.encode() for b in barcodes]).reshape(n, 1))
        h5.create_dataset("coords", data=np.zeros((n, 2), dtype=np.int64))
        h5.attrs.update({"um_per_px": 0.5, "patch_size_px": px})
    return img, barcodes


@pytest.fixture
def weights(tmp_path):
    """tiny-test's weights as `fetch_weights` leaves them: a safetensors file in build()'s key layout."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = get_encoder(ENCODER).build()
    path = tmp_path / "weights" / ENCODER / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def patches(tmp_path):
    path = tmp_path / "patches" / "S1.h5"
    img, barcodes = write_patch_file(path)
    return path, img, barcodes


def direct(weights, img) -> np.ndarray:
    enc = load_encoder(ENCODER, weights, device="cpu")
    with torch.no_grad():
        return enc.embed_uint8(img).numpy()


def embed(weights, patches_h5, out, **kwargs):
    return embed_patches(ENCODER, weights, patches_h5, out, **{"device": "cpu", "progress": False, **kwargs})


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_float32_cache_equals_a_direct_forward_in_file_order(tmp_path, weights, patches):
    path, img, barcodes = patches
    out = tmp_path / "emb" / "S1.h5"
    summary = embed(weights, path, out, dtype="float32", batch_size=4)
    got = read_embeddings(out, encoder=ENCODER)
    assert summary["n_patches"] == 10 and summary["embed_dim"] == 16
    assert list(got.barcodes) == barcodes
    assert got.values.shape == (10, 16) and got.values.dtype == np.float32
    np.testing.assert_allclose(got.values, direct(weights, img), rtol=1e-6, atol=1e-6)
    with h5py.File(out, "r") as h5:
        assert h5["embeddings"].dtype == np.float32 and h5["barcode"].shape == (10, 1)
    attrs = got.attrs
    assert attrs["encoder"] == ENCODER and attrs["embed_dim"] == 16 and attrs["dtype"] == "float32"
    assert attrs["input_size"] == 32 and attrs["n_patches"] == 10 and attrs["patches"] == str(path)
    assert attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert attrs["amp"] in (False, 0) and "torch" in json.loads(attrs["versions"])
    assert str(attrs["patches_identity"]).startswith(("sha256:", "size:"))


def test_float16_cache_is_the_forward_rounded_to_float16(tmp_path, weights, patches):
    path, img, _ = patches
    out = tmp_path / "S1.h5"
    embed(weights, path, out, dtype="float16")
    with h5py.File(out, "r") as h5:
        stored = h5["embeddings"][()]
    assert stored.dtype == np.float16
    expected = direct(weights, img)
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2**-10, atol=1e-6)
    assert read_embeddings(out).values.dtype == np.float32


def test_batch_size_and_loader_workers_do_not_change_the_result(tmp_path, weights, patches):
    path = patches[0]
    runs = {}
    for name, kwargs in {"b1": {"batch_size": 1}, "b3": {"batch_size": 3}, "b64": {"batch_size": 64},
                         "w2": {"batch_size": 3, "num_workers": 2}}.items():
        embed(weights, path, tmp_path / f"{name}.h5", dtype="float32", **kwargs)
        runs[name] = read_embeddings(tmp_path / f"{name}.h5")
    for name, got in runs.items():
        assert list(got.barcodes) == list(runs["b64"].barcodes), name
        np.testing.assert_allclose(got.values, runs["b64"].values, rtol=1e-6, atol=1e-6, err_msg=name)


def test_patches_are_resized_to_the_encoders_input(tmp_path, weights):
    img, _ = write_patch_file(tmp_path / "big.h5", n=5, px=48)
    embed(weights, tmp_path / "big.h5", tmp_path / "out.h5", dtype="float32")
    np.testing.assert_allclose(read_embeddings(tmp_path / "out.h5").values, direct(weights, img), rtol=1e-6, atol=1e-6)


def test_weight_checksum_from_source_json_or_random(tmp_path, weights, patches):
    (weights.parent / "SOURCE.json").write_text(json.dumps({"file": "model.safetensors", "sha256": "c" * 64}))
    assert weights_checksum(weights) == "c" * 64
    embed(None, patches[0], tmp_path / "random.h5")
    assert read_embeddings(tmp_path / "random.h5").attrs["weights_sha256"] == "random"


def test_missing_or_corrupt_patch_file_is_one_line_and_writes_nothing(tmp_path, weights):
    out_dir = tmp_path / "emb"
    with pytest.raises(CMRCNetError, match=r"nope\.h5: patch file not found$"):
        embed(weights, tmp_path / "nope.h5", out_dir / "x.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(CMRCNetError, match=r"junk\.h5: cannot read as HDF5, file is corrupt"):
        embed(weights, junk, out_dir / "x.h5")
    assert leftovers(out_dir) == []


def test_wrong_shape_img_is_one_line_and_writes_nothing(tmp_path, weights):
    bad = tmp_path / "gray.h5"
    with h5py.File(bad, "w") as h5:
        h5.create_dataset("img", data=np.zeros((4, 32, 32), dtype=np.uint8))
        h5.create_dataset("barcode", data=np.array([b"a", b"b", b"c", b"d"]).reshape(4, 1))
    with pytest.raises(CMRCNetError, match=r"gray\.h5: 'img' has shape \(4, 32, 32\), expected \(N, H, W, 3\)"):
        embed(weights, bad, tmp_path / "emb" / "x.h5")
    assert leftovers(tmp_path / "emb") == []


def test_unreadable_patch_data_is_one_line_and_writes_nothing(tmp_path, weights):
    """A file whose index reads but whose compressed patch chunks are damaged (a truncated copy, a bad disk)."""
    path = tmp_path / "damaged.h5"
    write_patch_file(path, n=10, compression="gzip")
    with h5py.File(path, "r") as h5:
        offset = h5["img"].id.get_chunk_info(5).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)
    with pytest.raises(CMRCNetError, match=r"damaged\.h5: cannot read the patches \(file corrupt\?\)"):
        embed(weights, path, tmp_path / "emb" / "x.h5", batch_size=4)
    assert leftovers(tmp_path / "emb") == []


def test_bad_arguments_are_one_line(tmp_path, weights, patches):
    with pytest.raises(CMRCNetError, match=r"dtype: must be one of float16, float32, got 'int8'"):
        embed(weights, patches[0], tmp_path / "x.h5", dtype="int8")
    with pytest.raises(CMRCNetError, match=r"batch_size: must be a whole number of at least 1, got 0"):
        embed(weights, patches[0], tmp_path / "x.h5", batch_size=0)
    assert not (tmp_path / "x.h5").exists()


def test_read_embeddings_refuses_another_encoders_or_weights_cache(tmp_path, weights, patches):
    out = tmp_path / "S1.h5"
    embed(weights, patches[0], out)
    sha = weights_checksum(weights)
    assert read_embeddings(out, encoder=ENCODER, weights_sha256=sha).values.shape == (10, 16)
    with pytest.raises(CMRCNetError, match=r"S1\.h5: embeddings of encoder 'tiny-test', expected 'uni'; re-embed$"):
        read_embeddings(out, encoder="uni")
    with pytest.raises(CMRCNetError, match=r"S1\.h5: embeddings made with other tiny-test weights \(sha256 "):
        read_embeddings(out, weights_sha256="0" * 64)
    with pytest.raises(CMRCNetError, match=r"other\.h5: embedding file not found"):
        read_embeddings(tmp_path / "other.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as h5:
        h5.create_dataset("embeddings", data=np.zeros((2, 3)))
    with pytest.raises(CMRCNetError, match=r"foreign\.h5: no 'barcode' dataset; not an embedding file"):
        read_embeddings(tmp_path / "foreign.h5")


def test_a_loaded_encoder_embeds_several_files_with_one_load(tmp_path, weights, patches):
    enc = load_encoder(ENCODER, weights, device="cpu")
    embed_patches(enc, weights, patches[0], tmp_path / "a.h5", dtype="float32", progress=False)
    embed(weights, patches[0], tmp_path / "b.h5", dtype="float32")
    a, b = read_embeddings(tmp_path / "a.h5"), read_embeddings(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.values, b.values)
    assert a.attrs["encoder"] == ENCODER and a.attrs["weights_sha256"] == b.attrs["weights_sha256"]
