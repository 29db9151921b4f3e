"""Gene towers: log-normalised expression (B, G) -> one vector per spot (B, out_dim), the expression side of the
`crossmodal` model. Each tower is a module with `out_dim`; "scvi" is pretrained on the fold's training spots by
`fit` before the contrastive training and stays frozen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import warnings

import numpy as np
import torch
from torch import nn

from cmrcnet.errors import input_error
from cmrcnet.models.cmrcnet import SNNEncoder

log = logging.getLogger("cmrcnet")

GENE_TOWERS = ("mlp", "snn", "transformer", "scvi")


class MLPTower(nn.Sequential):
    """`depth` blocks of Linear + GELU + Dropout, `hidden` wide: the plain baseline."""

    def __init__(self, n_genes: int, hidden: int = 256, depth: int = 2, dropout: float = 0.1):
        layers: list[nn.Module] = []
        in_dim = n_genes
        for _ in range(depth):
            layers += [nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout)]
            in_dim = hidden
        super().__init__(*layers)
        self.out_dim = hidden


class SNNTower(SNNEncoder):
    """CMRCNet's self-normalising gene encoder, `depth` SELU blocks `hidden` wide."""

    def __init__(self, n_genes: int, hidden: int = 256, depth: int = 2, dropout: float = 0.1):
        super().__init__(n_genes, [hidden] * depth, dropout)
        self.out_dim = hidden


class GeneTransformer(nn.Module):
    """Each gene is a token: a learned gene-identity embedding plus a linear projection of its value, so the
    attention can relate genes by identity and level; a learned CLS token, read out after `depth` pre-LN layers,
    summarises the spot. `hidden` is the feed-forward width."""

    def __init__(self, n_genes: int, hidden: int = 256, depth: int = 2, dropout: float = 0.1, *, dim: int = 64,
                 heads: int = 4):
        super().__init__()
        if dim % heads:
            raise input_error("gene_kwargs", f"transformer dim {dim} is not divisible by heads {heads}")
        self.gene_embedding = nn.Parameter(torch.randn(n_genes, dim) * 0.02)
        self.value_projection = nn.Linear(1, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.out_dim = dim

    def forward(self, expr: torch.Tensor) -> torch.Tensor:
        tokens = self.gene_embedding + self.value_projection(expr.unsqueeze(-1))  # (B, G, dim)
        cls = self.cls_token.expand(expr.shape[0], -1, -1)
        return self.encoder(torch.cat([cls, tokens], dim=1))[:, 0]


class ScviTower(nn.Module):
    """A frozen scVI encoder (Lopez et al. 2018) pretrained on the fold's training spots; the embedding is the
    posterior mean q_m of the latent (deterministic, unlike a sample).

    Configured for the expression this pipeline feeds, which is log-normalised (not counts, maybe not integers):
    gene_likelihood="normal" (a count likelihood would model the wrong data) and log_variational=False (no
    log1p inside the encoder). The same normalised input reaches the tower at fit time, in training, and at
    retrieval (the bank and prediction code call `embed_expression` on normalised expression), so the encoder
    sees one input distribution throughout. The module is built without data (shapes only) so that a checkpoint
    reloads through create_model + load_state_dict; `fitted` is a persistent buffer and travels with it."""

    def __init__(self, n_genes: int, hidden: int = 256, depth: int = 2, dropout: float = 0.1, *, n_latent: int = 32):
        super().__init__()
        from scvi.module import VAE

        self.vae_settings = dict(n_hidden=hidden, n_latent=n_latent, n_layers=depth, dropout_rate=dropout,
                                 gene_likelihood="normal", log_variational=False)
        self.n_genes = n_genes
        self.z_encoder = VAE(n_input=n_genes, **self.vae_settings).z_encoder  # the decoder is only needed in fit
        self.z_encoder.requires_grad_(False)
        self.register_buffer("fitted", torch.tensor(False))
        self.out_dim = n_latent

    def train(self, mode: bool = True) -> ScviTower:
        """The encoder is frozen: always eval (batch-norm running statistics, no dropout)."""
        super().train(mode)
        self.z_encoder.eval()
        return self

    def forward(self, expr: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.fitted):
            raise RuntimeError("scvi gene tower used in training before fit(): call the model's prepare() with the "
                               "fold's training expression first")
        with torch.no_grad():
            dist, _ = self.z_encoder(expr.float())
        return dist.loc

    def fit(self, expression: np.ndarray, *, max_epochs: int = 100, seed: int = 0, batch_size: int = 128,
            accelerator: str = "cpu"):
        """Train scvi.model.SCVI (same architecture settings) on `expression` (spots x genes, the fold's training
        spots only), copy its trained z_encoder here and freeze it; returns the trained SCVI model. The fit is seeded
        with `scvi.settings.seed = seed` (reproducible on CPU), inside `_seeded`, so the caller's random streams and
        cuDNN settings are as they were afterwards."""
        import anndata
        import scvi

        x = np.asarray(expression, dtype=np.float32)
        where = "scvi gene tower"
        if x.ndim != 2 or x.shape[1] != self.n_genes:
            raise input_error(where, f"expected expression (spots, {self.n_genes}), got shape {x.shape}")
        if x.shape[0] < 3:
            raise input_error(where, f"needs at least 3 training spots, got {x.shape[0]}")
        if not np.isfinite(x).all() or (x < 0).any():
            raise input_error(where, "expression must be finite and non-negative (log-normalised)")
        if max_epochs < 1:
            raise input_error(where, f"max_epochs must be >= 1, got {max_epochs}")
        adata = anndata.AnnData(x)
        with _quiet(), _seeded(seed):
            scvi.model.SCVI.setup_anndata(adata)
            model = scvi.model.SCVI(adata, **self.vae_settings)
            # all given spots train (they are already the fold's training split); the last partial batch is dropped
            # when larger batches exist, since scVI's batch norm fails on a batch of one spot
            model.train(max_epochs=max_epochs, accelerator=accelerator, devices=1, batch_size=batch_size,
                        train_size=1.0, datasplitter_kwargs={"drop_last": x.shape[0] > batch_size},
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        logger=False)
        self.z_encoder.load_state_dict(model.module.z_encoder.state_dict())
        self.z_encoder.requires_grad_(False)
        self.z_encoder.eval()
        self.fitted.fill_(True)
        log.info("scvi gene tower: fitted on %d spots x %d genes, %d epochs, seed %d", *x.shape, max_epochs, seed)
        return model


@contextlib.contextmanager
def _seeded(seed: int):
    """`scvi.settings.seed = seed` for the block, undoing its global side effects afterwards: it reseeds Python,
    NumPy and torch, and switches cuDNN to deterministic without benchmarking (which would slow the contrastive
    training that follows), so a model with the scVI tower does not change the rest of the run's random stream."""
    import scvi

    py_state, np_state = random.getstate(), np.random.get_state()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    env = {key: os.environ.get(key) for key in ("XLA_FLAGS", "PL_GLOBAL_SEED")}
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            scvi.settings.seed = seed
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def _quiet():
    """Silence scVI's expected warning (the data are not counts, on purpose) and Lightning's banner lines."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning", "scvi")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not contain unnormalized count data.*")
        warnings.filterwarnings("ignore", message=".*srun.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch, harmless
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


_TOWERS = {"mlp": MLPTower, "snn": SNNTower, "transformer": GeneTransformer, "scvi": ScviTower}
_EXTRA = {"transformer": ("dim", "heads"), "scvi": ("n_latent",)}


def make_gene_tower(kind: str, n_genes: int, *, hidden: int = 256, depth: int = 2, dropout: float = 0.1,
                    **kw) -> nn.Module:
    """Gene tower `kind` (one of GENE_TOWERS) mapping (B, n_genes) -> (B, out_dim). `hidden` / `depth` /
    `dropout` size every kind (transformer: feed-forward width / layers; scvi: n_hidden / n_layers / dropout_rate);
    extra settings: transformer `dim` (64), `heads` (4); scvi `n_latent` (32)."""
    if kind not in _TOWERS:
        raise input_error("gene", f"unknown gene tower {kind!r}; use one of {', '.join(GENE_TOWERS)}")
    allowed = _EXTRA.get(kind, ())
    extra = [key for key in kw if key not in allowed]
    if extra:
        known = ", ".join(("hidden", "depth", "dropout") + allowed)
        raise input_error("gene_kwargs", f"gene tower {kind!r} has no setting {', '.join(map(repr, extra))}; "
                          f"known: {known}")
    if hidden < 1 or depth < 1:
        raise input_error("gene_kwargs", f"hidden and depth must be >= 1, got hidden={hidden}, depth={depth}")
    if not 0 <= dropout < 1:
        raise input_error("gene_kwargs", f"dropout must be in [0, 1), got {dropout}")
    return _TOWERS[kind](n_genes, hidden, depth, dropout, **kw)
