"""The `cmrcnet` command's encoder subcommands: list-encoders, fetch-weights --from-file, embed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hestbench_fake import write_patches

from cmrcnet.cli import main
from cmrcnet.encoders import load_encoder, write_tiny_test_weights
from cmrcnet.inference.embed import read_embeddings


def test_list_encoders_shows_each_entry_with_its_size_and_hub_file(capsys):
    main(["list-encoders"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"uni", "virchow2", "ctranspath", "tiny-test"} <= set(lines)
    assert "dim  2560" in lines["virchow2"] and "paige-ai/Virchow2" in lines["virchow2"]
    assert "MahmoodLab/hest-bench/fm_v1/ctranspath/ctranspath.pth (gated)" in lines["ctranspath"]


def test_import_a_local_file_then_embed_with_it(tmp_path, capsys):
    original = write_tiny_test_weights(tmp_path / "tiny.pt", seed=4)
    main(["fetch-weights", "tiny-test", "--from-file", str(original), "--dir", str(tmp_path / "weights")])
    weights = tmp_path / "weights" / "tiny-test" / "model.safetensors"
    source = json.loads((weights.parent / "SOURCE.json").read_text())
    assert source["local_path"] == str(original)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    barcodes = [f"b{i}" for i in range(7)]
    write_patches(tmp_path / "p.h5", barcodes, images, np.zeros((7, 2)))
    out = tmp_path / "emb.h5"
    main(["embed", "tiny-test", str(tmp_path / "p.h5"), "--weights", str(weights), "--out", str(out),
          "--dtype", "float32", "--batch-size", "3", "--device", "cpu"])
    emb = read_embeddings(out, encoder="tiny-test")
    assert list(emb.barcodes) == barcodes
    # the same numbers as the encoder loaded from the original checkpoint's weights, applied by hand
    encoder = load_encoder("tiny-test", weights)
    state = torch.load(original, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in encoder.model.state_dict().items())
    np.testing.assert_allclose(emb.values, encoder.embed_uint8(images).numpy(), rtol=1e-6, atol=1e-6)


def test_from_file_takes_one_encoder(tmp_path):
    with pytest.raises(SystemExit):
        main(["fetch-weights", "tiny-test", "uni", "--from-file", str(tmp_path / "x.pt")])
