"""HEST-Benchmark tasks as published: fetch from a fake hub, read the splits and genes, targets, probe scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from fakehub import ACCEPTED, NO_TERMS, FakeHub
from hestbench_fake import FOLDS, GENES, SAMPLES, write_fake_bench, write_split
from huggingface_hub.utils import filter_repo_objects
from scipy.stats import pearsonr
from test_hest import hub_env  # noqa: F401 - the isolated-hub fixture is shared

from cmrcnet.data.hestbench import (
    HESTBENCH_REPO,
    MANIFEST,
    align_targets,
    fetch_task,
    probe_task,
    read_manifest,
    read_task,
    result_rows,
    task_name,
    task_patterns,
    task_targets,
)
from cmrcnet.errors import CMRCNetError

TOKEN = "hf_FAKEbenchTOKEN1234567890"
NO_TERMS_TOKEN = "hf_FAKEnoTERMSbench0987654321"
TERMS_URL = f"https://huggingface.co/datasets/{HESTBENCH_REPO}"


def task_files(task_dir: Path) -> set[str]:
    return {p.relative_to(task_dir).as_posix() for p in task_dir.rglob("*") if p.is_file()}


@pytest.fixture
def bench_repo(tmp_path):
    return write_fake_bench(tmp_path / "repo")


@pytest.fixture
def hub(tmp_path, hub_env, bench_repo):  # noqa: F811
    with FakeHub(tmp_path / "repo", HESTBENCH_REPO, {TOKEN: ACCEPTED, NO_TERMS_TOKEN: NO_TERMS}) as server:
        hub_env(server.url)
        yield server


@pytest.fixture
def task_dir(bench_repo):
    return bench_repo["task_dir"]


# ------------------------------------------------------------------------------------------------ names, patterns


def test_task_names_and_aliases():
    assert task_name("idc") == "IDC"
    assert task_name("LUAD") == "LUNG"
    assert task_name("ccRCC") == "CCRCC"
    assert task_name("LYMPH IDC") == "LYMPH_IDC"
    with pytest.raises(CMRCNetError, match="unknown task 'BRCA'.*IDC, PRAD") as err:
        task_name("BRCA")
    assert "\n" not in str(err.value)


def test_patterns_take_one_task_without_pictures(tmp_path, bench_repo):
    files = [p.relative_to(tmp_path / "repo").as_posix() for p in (tmp_path / "repo").rglob("*") if p.is_file()]
    allow, ignore = task_patterns("IDC")
    picked = set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
    expected = {f"IDC/{p}" for s in SAMPLES for p in (f"patches/{s}.h5", f"adata/{s}.h5ad")}
    expected |= {f"IDC/splits/{part}_{i}.csv" for part in ("train", "test") for i in range(2)} | {"IDC/var_50genes.json"}
    assert picked == expected


# ------------------------------------------------------------------------------------------------ fetching


def test_fetch_task_from_the_hub(hub, tmp_path):
    root = tmp_path / "bench"
    task_dir = fetch_task("IDC", root, token=TOKEN)
    assert task_dir == root / "IDC"
    assert task_files(task_dir) - {MANIFEST} == {f.removeprefix("IDC/") for f in hub.files() if f.startswith("IDC/")
                                                 and "/vis/" not in f and "mean_50genes" not in f}
    assert not (root / "PRAD").exists() and not (root / "fm_v1").exists()
    info = read_manifest(task_dir)
    assert (info["repo_id"], info["commit"], info["task"]) == (HESTBENCH_REPO, hub.commit(), "IDC")
    assert sorted(info["samples"]) == sorted(SAMPLES)
    assert info["samples"]["TENX95"] == {"patches": "patches/TENX95.h5", "expression": "adata/TENX95.h5ad",
                                         "n_patches": 24}
    assert info["folds"] == [{"train": list(tr), "test": list(te)} for tr, te in FOLDS]
    assert info["genes"] == list(GENES) and info["n_folds"] == 2
    sizes = {f["path"]: f["size"] for f in info["files"]}
    assert sizes["var_50genes.json"] == (task_dir / "var_50genes.json").stat().st_size
    assert set(sizes) == task_files(task_dir) - {MANIFEST}
    assert info["fetched_at"].endswith("+00:00")
    for path in root.rglob("*"):  # the token is nowhere on disk
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_second_fetch_asks_the_hub_nothing_and_a_lost_file_is_fetched_again(hub, tmp_path, monkeypatch):
    root = tmp_path / "bench"
    fetch_task("IDC", root, token=TOKEN)
    seen, gets = len(hub.requests), hub.count("GET")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert fetch_task("IDC", root) == root / "IDC"  # no token needed: nothing is asked
    assert len(hub.requests) == seen

    (root / "IDC" / "patches" / "TENX95.h5").unlink()
    fetch_task("IDC", root, token=TOKEN)
    assert hub.count("GET") == gets + 1
    assert (root / "IDC" / "patches" / "TENX95.h5").is_file()
    with pytest.raises(CMRCNetError, match="revision 'v9' not found"):  # another revision asks the hub again
        fetch_task("IDC", root, token=TOKEN, revision="v9")


def one_line_and_safe(msg: str, root: Path) -> None:
    assert "\n" not in msg and TOKEN not in msg and NO_TERMS_TOKEN not in msg
    for path in root.rglob("*") if root.exists() else ():
        if path.is_file():
            assert NO_TERMS_TOKEN.encode() not in path.read_bytes()


def test_gated_without_accepted_terms(hub, tmp_path):
    root = tmp_path / "bench"
    with pytest.raises(CMRCNetError, match="gated") as err:
        fetch_task("IDC", root, token=NO_TERMS_TOKEN)
    assert TERMS_URL in str(err.value)
    one_line_and_safe(str(err.value), root)
    assert not (root / "IDC" / MANIFEST).exists()


def test_missing_and_rejected_tokens(hub, tmp_path):
    with pytest.raises(CMRCNetError, match="no Hugging Face token") as err:
        fetch_task("IDC", tmp_path / "bench")
    assert "HF_TOKEN" in str(err.value) and hub.requests == []
    with pytest.raises(CMRCNetError, match="401") as err:
        fetch_task("IDC", tmp_path / "bench", token="hf_unknownToken")
    assert "hf_unknownToken" not in str(err.value)


def test_task_absent_from_the_repo(hub, tmp_path):
    with pytest.raises(CMRCNetError, match=r"^task PAAD not found in MahmoodLab/hest-bench"):
        fetch_task("PAAD", tmp_path / "bench", token=TOKEN)


def test_download_that_fails_validation_writes_no_manifest(hub, tmp_path):
    patches = hub.repo_dir / "IDC" / "patches" / "NCBI783.h5"
    with h5py.File(patches, "a") as h5:
        codes = h5["barcode"][()]
        codes[0, 0] = b"unknown"
        h5["barcode"][...] = codes
    root = tmp_path / "bench"
    with pytest.raises(CMRCNetError, match=r"NCBI783\.h5: 1 of 28 patch barcodes have no spot in NCBI783\.h5ad"):
        fetch_task("IDC", root, token=TOKEN)
    assert not (root / "IDC" / MANIFEST).exists()


# ------------------------------------------------------------------------------------------------ reading


def test_read_task(task_dir):
    task = read_task(task_dir)
    assert task.name == "IDC" and task.genes == GENES
    assert task.folds == FOLDS
    assert task.sample("TENX95").patches == task_dir / "patches" / "TENX95.h5"
    assert task.sample("TENX95").expression == task_dir / "adata" / "TENX95.h5ad"
    assert task.split_files[1] == (task_dir / "splits" / "train_1.csv", task_dir / "splits" / "test_1.csv")
    for train, test in task.folds:  # the tuples unpack as (train, test)
        assert not set(train) & set(test)


def _drop_column(d: Path):
    csv = d / "splits" / "train_0.csv"
    pd.read_csv(csv).drop(columns="patches_path").to_csv(csv, index=False)


def _bad_genes(d: Path):
    (d / "var_50genes.json").write_text(json.dumps({"genes": [*GENES, "NOTAGENE", "ALSONOT"]}))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: [p.unlink() for p in (d / "splits").iterdir()] and (d / "splits").rmdir(),
     r"IDC/splits: splits folder not found"),
    (lambda d: [p.unlink() for p in (d / "splits").iterdir()], r"IDC/splits: no split files"),
    (lambda d: (d / "splits" / "test_1.csv").unlink(), r"splits/test_1\.csv: not found, but split 1 exists"),
    (_drop_column, r"splits/train_0\.csv: no column\(s\) patches_path"),
    (lambda d: (d / "patches" / "NCBI785.h5").unlink(),
     r"splits/train_0\.csv: sample NCBI785: patch file patches/NCBI785\.h5 not found"),
    (lambda d: (d / "adata" / "TENX95.h5ad").unlink(),
     r"splits/test_0\.csv: sample TENX95: expression file adata/TENX95\.h5ad not found"),
    (lambda d: write_split(d / "splits" / "test_1.csv", []), r"splits/test_1\.csv: empty test set"),
    (lambda d: write_split(d / "splits" / "test_0.csv", ["TENX95", "TENX99"]),
     r"splits/test_0\.csv: sample\(s\) TENX99 also in train_0\.csv"),
    (_bad_genes, r"adata/\w+\.h5ad: 2 of the task's 10 genes missing from the expression file \(first: NOTAGENE"),
    (lambda d: (d / "var_50genes.json").unlink(), r"var_50genes\.json: gene list not found"),
    (lambda d: (d / "var_50genes.json").write_text('{"genes": []}'), r"var_50genes\.json: expected"),
    (lambda d: (d / "adata" / "TENX99.h5ad").write_bytes(b"not hdf5"), r"TENX99\.h5ad: cannot read as AnnData"),
])
def test_read_task_errors_name_the_file(task_dir, damage, message):
    damage(task_dir)
    with pytest.raises(CMRCNetError, match=message) as err:
        read_task(task_dir)
    assert "\n" not in str(err.value)


def test_targets_are_log1p_of_the_counts_in_gene_list_order(task_dir, bench_repo):
    task = read_task(task_dir)
    truth = bench_repo["samples"]["NCBI783"]
    barcodes, Y = task_targets(task, "NCBI783")
    assert len(barcodes) == len(truth["barcodes"]) + 2  # the expression file has spots without a patch
    aligned = align_targets(barcodes, Y, truth["barcodes"], "here")
    np.testing.assert_array_equal(aligned, np.log1p(truth["counts"].astype(np.float64)))
    assert aligned.dtype == np.float64
    with pytest.raises(CMRCNetError, match=r"^emb\.h5: 1 of 2 spots have no expression \(first: 'nope'\)"):
        align_targets(barcodes, Y, [truth["barcodes"][0], "nope"], "emb.h5")


# ------------------------------------------------------------------------------------------------ probing


def write_embeddings(path: Path, barcodes, values: np.ndarray, encoder: str = "stand-in", sha: str = "0" * 64) -> Path:
    """An embedding cache file in `cmrcnet.inference.embed`'s layout."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("embeddings", data=values.astype(np.float32))
        h5.create_dataset("barcode", data=np.array([str(b).encode() for b in barcodes]).reshape(-1, 1))
        h5.attrs.update({"encoder": encoder, "weights_sha256": sha, "embed_dim": values.shape[1], "dtype": "float32"})
    return path


def stand_in_embeddings(bench: dict, out: Path, dim: int = 6, **kw) -> dict[str, Path]:
    """Simple image features: per patch the mean of each colour channel, plus seeded noise dimensions."""
    rng = np.random.default_rng(5)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for sample in bench["samples"]:
        with h5py.File(bench["task_dir"] / "patches" / f"{sample}.h5") as h5:
            img = h5["img"][()].astype(np.float64)
            codes = [b.decode() for b in h5["barcode"][()].reshape(-1)]
        feats = np.concatenate([img.mean(axis=(1, 2)) / 255, rng.normal(0, 1, (len(img), dim - 3))], axis=1)
        paths[sample] = write_embeddings(out / f"{sample}.h5", codes, feats, **kw)
    return paths


def by_hand(bench: dict, paths: dict, samples) -> tuple[np.ndarray, np.ndarray]:
    X, Y = [], []
    for s in samples:
        with h5py.File(paths[s]) as h5:
            X.append(h5["embeddings"][()].astype(np.float64))
        Y.append(np.log1p(bench["samples"][s]["counts"].astype(np.float64)))
    return np.concatenate(X), np.concatenate(Y)


def test_probe_task_knn_matches_a_hand_computation(task_dir, bench_repo, tmp_path):
    paths = stand_in_embeddings(bench_repo, tmp_path / "emb")
    out = tmp_path / "res" / "IDC.json"
    result = probe_task(task_dir, paths, "knn", probe_params={"ks": [1]}, out_json=out)
    assert result["probes"].keys() == {"knn-k1"} and result["encoder"] == "stand-in"
    fold_means = []
    for i, (train, test) in enumerate(FOLDS):
        X_tr, Y_tr = by_hand(bench_repo, paths, train)
        X_te, Y_te = by_hand(bench_repo, paths, test)
        unit = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731
        nearest = np.argmax(unit(X_te.astype(np.float32)) @ unit(X_tr.astype(np.float32)).T, axis=1)
        pred = Y_tr[nearest]
        r = [pearsonr(Y_te[:, g], pred[:, g])[0] for g in range(len(GENES))]
        fold = result["probes"]["knn-k1"]["folds"][i]
        np.testing.assert_allclose([fold["pearson_per_gene"][g] for g in GENES], r, rtol=1e-6, atol=1e-9)
        assert fold["pearson_mean"] == pytest.approx(np.mean(r), abs=1e-9)
        assert result["folds"][i]["n_test_spots"] == len(Y_te)
        fold_means.append(np.mean(r))
    knn = result["probes"]["knn-k1"]
    assert knn["pearson_mean"] == pytest.approx(np.mean(fold_means), abs=1e-9)
    assert knn["pearson_std"] == pytest.approx(np.std(fold_means), abs=1e-9)  # ddof 0, as HEST
    assert json.loads(out.read_text())["probes"]["knn-k1"]["pearson_mean"] == pytest.approx(knn["pearson_mean"])
    assert result_rows(result) == [{"task": "IDC", "encoder": "stand-in", "probe": "knn-k1", "n_folds": 2,
                                    "pearson_mean": knn["pearson_mean"], "pearson_std": knn["pearson_std"]}]


def test_probe_task_ridge_is_hest_recipe(task_dir, bench_repo, tmp_path):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    paths = stand_in_embeddings(bench_repo, tmp_path / "emb")
    result = probe_task(task_dir, paths, "ridge-hestbench", probe_params={"tol": 1e-10})
    means = []
    for train, test in FOLDS:
        X_tr, Y_tr = by_hand(bench_repo, paths, train)
        X_te, Y_te = by_hand(bench_repo, paths, test)
        scaler = StandardScaler().fit(X_tr)
        pca = PCA(n_components=X_tr.shape[1], random_state=1).fit(scaler.transform(X_tr))
        Z_tr, Z_te = pca.transform(scaler.transform(X_tr)), pca.transform(scaler.transform(X_te))
        ridge = Ridge(alpha=100 / (Z_tr.shape[1] * len(GENES)), fit_intercept=False).fit(Z_tr, Y_tr)
        pred = ridge.predict(Z_te)
        means.append(np.mean([pearsonr(Y_te[:, g], pred[:, g])[0] for g in range(len(GENES))]))
    ridge_result = result["probes"]["ridge-hestbench"]
    assert ridge_result["pearson_mean"] == pytest.approx(np.mean(means), abs=1e-4)
    assert ridge_result["pearson_std"] == pytest.approx(np.std(means), abs=1e-4)
    assert result["seed"] == 1 and result["probe_params"]["seed"] == 1
    assert ridge_result["pearson_mean"] > 0.2  # the patches carry the signal


def test_constant_gene_is_reported_and_left_out(tmp_path):
    bench = write_fake_bench(tmp_path / "repo", constant_gene="ZERO")
    paths = stand_in_embeddings(bench, tmp_path / "emb")
    out = tmp_path / "r.json"
    result = probe_task(bench["task_dir"], paths, "knn", probe_params={"ks": [1]}, out_json=out)
    fold = result["probes"]["knn-k1"]["folds"][0]
    assert fold["undefined_genes"] == {"ZERO": "constant truth and prediction"}
    assert fold["pearson_per_gene"]["ZERO"] is None and fold["n_genes_scored"] == len(GENES)
    assert fold["pearson_mean"] == pytest.approx(np.mean([fold["pearson_per_gene"][g] for g in GENES]))
    assert result["probes"]["knn-k1"]["per_gene"]["ZERO"] == {"mean": None, "std": None}
    assert "NaN" not in out.read_text()  # strict JSON


def test_probe_task_input_errors(task_dir, bench_repo, tmp_path):
    paths = stand_in_embeddings(bench_repo, tmp_path / "emb")
    with pytest.raises(CMRCNetError, match=r"hest-bench IDC: no embedding file given for sample\(s\) NCBI785"):
        probe_task(task_dir, {s: p for s, p in paths.items() if s != "NCBI785"}, "knn", probe_params={"ks": [1]})
    other = stand_in_embeddings(bench_repo, tmp_path / "other", encoder="another")
    mixed = {**paths, "NCBI783": other["NCBI783"]}
    with pytest.raises(CMRCNetError, match=r"NCBI783\.h5: encoder 'another' differs from 'stand-in'"):
        probe_task(task_dir, mixed, "knn", probe_params={"ks": [1]})
    with pytest.raises(CMRCNetError, match="expected 'uni'"):
        probe_task(task_dir, paths, "knn", probe_params={"ks": [1]}, encoder="uni")
    with h5py.File(paths["TENX95"], "a") as h5:  # an embedded patch the expression file does not have
        codes = h5["barcode"][()]
        codes[3, 0] = b"ghost"
        h5["barcode"][...] = codes
    with pytest.raises(CMRCNetError, match=r"TENX95\.h5ad: 1 of 24 spots have no expression \(first: 'ghost'\)"):
        probe_task(task_dir, paths, "knn", probe_params={"ks": [1]})


def test_undefined_fold_means_are_not_averaged_as_numbers():
    from cmrcnet.data.hestbench import _summary

    s = _summary([0.5, math.nan, 0.3], np.array([[0.5, 0.5], [np.nan, np.nan], [0.3, 0.3]]), ["A", "B"])
    assert s["pearson_mean"] == pytest.approx(0.4) and s["n_folds_undefined"] == 1 and s["n_folds"] == 3


def test_one_fake_hub_serves_the_bench_and_a_model_repo(tmp_path, hub_env, bench_repo):  # noqa: F811
    from huggingface_hub import hf_hub_download

    model = tmp_path / "model"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(b"tiny weights\n")
    tokens = {TOKEN: ACCEPTED, NO_TERMS_TOKEN: NO_TERMS}
    with FakeHub(tmp_path / "repo", HESTBENCH_REPO, tokens) as server:
        server.add_repo(model, "cmrcnet/tiny-test-encoder", repo_type="model", gated=True)
        hub_env(server.url)
        task_dir = fetch_task("IDC", tmp_path / "bench", token=TOKEN)
        assert read_manifest(task_dir)["commit"] == server.commit() == server.commit(HESTBENCH_REPO)
        got = hf_hub_download("cmrcnet/tiny-test-encoder", "pytorch_model.bin", token=TOKEN,
                              local_dir=tmp_path / "w")
        assert Path(got).read_bytes() == b"tiny weights\n"
        assert server.files("cmrcnet/tiny-test-encoder") == {"pytorch_model.bin": model / "pytorch_model.bin"}
        assert server.commit("cmrcnet/tiny-test-encoder") != server.commit()
        with pytest.raises(Exception, match="403|restricted|gated"):
            hf_hub_download("cmrcnet/tiny-test-encoder", "pytorch_model.bin", token=NO_TERMS_TOKEN,
                            local_dir=tmp_path / "w2")
        with pytest.raises(CMRCNetError, match="not found"):  # a dataset of the model's name does not exist
            fetch_task("IDC", tmp_path / "b2", token=TOKEN, repo_id="cmrcnet/tiny-test-encoder")
