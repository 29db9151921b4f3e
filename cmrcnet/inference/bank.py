"""The reference bank a retrieval model carries, so that it can predict on a new slide with nothing else.

Why: CMRCNet and BLEEP predict a spot's expression as the mean expression of the training spots whose gene-tower
embeddings are closest to the spot's image embedding. A model file alone is therefore not deployable: it also
needs those training spots. At the end of training, `attach_bank` stores in `best.pt` the gene-tower embedding and
the normalised expression of every training spot (validation spots included, as `predict_fold` uses them), with
the gene names, sample names and barcodes, and the patch resolution the model was trained at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmrcnet.errors import input_error

BANK_KEY = "bank"
PATCHES_KEY = "patches"


@dataclass
class Bank:
    """Reference spots of a retrieval model: `embeddings` (n_ref, d), `expression` (n_ref, n_genes)."""

    embeddings: torch.Tensor
    expression: np.ndarray
    genes: list[str]
    samples: list[str]
    barcodes: list[str]


@torch.no_grad()
def embed_expression(model, expression: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Gene-tower embeddings of expression rows, in batches (bfloat16 autocast on a GPU, as in prediction)."""
    out = []
    for lo in range(0, len(expression), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(expression[lo: lo + batch_size])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model.embed_expression(chunk).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


def build_bank(model, data, device: torch.device, batch_size: int = 256) -> dict:
    """The bank of fold `data` (a `cmrcnet.data.datasets.Fold`): every training spot, in the fold's order."""
    part = data.all_spots(data.train_samples)
    expression = data.expression(part)
    model.eval()
    embeddings = embed_expression(model, expression, device, batch_size)
    barcodes = [str(b) for s, idx in part.items() for b in data.sample(s).barcodes[idx]]
    samples = [s for s, idx in part.items() for _ in idx]
    return {"embeddings": embeddings.contiguous(), "expression": torch.from_numpy(expression),
            "genes": list(data.genes), "samples": samples, "barcodes": barcodes}


def read_bank(ckpt: dict, path: str | Path) -> Bank:
    """The bank stored in checkpoint `ckpt` (read from `path`), checked for consistent shapes."""
    bank = ckpt.get(BANK_KEY)
    if bank is None:
        raise input_error(path, "no reference bank: a retrieval model needs one to predict on new slides; retrain "
                                "it with this version (the bank is stored in best.pt when training finishes)")
    emb, expr = bank["embeddings"], np.asarray(bank["expression"], dtype=np.float32)
    genes = [str(g) for g in bank["genes"]]
    if emb.ndim != 2 or expr.ndim != 2 or len(emb) != len(expr) or expr.shape[1] != len(genes):
        raise input_error(path, f"reference bank is inconsistent: embeddings {tuple(emb.shape)}, expression "
                                f"{expr.shape}, {len(genes)} genes")
    if genes != [str(g) for g in ckpt["genes"]]:
        raise input_error(path, "reference bank genes differ from the model's genes")
    return Bank(emb.float(), expr, genes, [str(s) for s in bank["samples"]], [str(b) for b in bank["barcodes"]])


def patch_settings_of(ckpt: dict, path: str | Path) -> dict:
    """{um_per_px, size_px} of the patches a checkpoint's model was trained on."""
    settings = ckpt.get(PATCHES_KEY)
    if not settings:
        raise input_error(path, "does not record the patch resolution it was trained at; retrain it with this "
                                "version")
    return {"um_per_px": float(settings["um_per_px"]), "size_px": int(settings["size_px"])}
