"""A small non-linear probe on frozen features: one hidden layer, trained with Adam, early stopping on a grouped
inner validation split. Seeded and deterministic on the CPU (its own random stream; the global one is untouched).
"""

from __future__ import annotations

import logging

import numpy as np

from cmrcnet.errors import input_error
from cmrcnet.probes.base import check_features, check_fit_inputs

log = logging.getLogger("cmrcnet")

SMALL_LAYER = 1 << 22


def grouped_validation(n: int, groups, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, validation) spot indices and how they were split.

    With 2 or more groups, whole groups (samples or patients) are held out, in a seeded order, until at least
    `fraction` of the spots are; at least one group stays on each side. Otherwise a seeded `fraction` of the spots,
    with a logged note (spots of one sample are correlated, so early stopping is then optimistic)."""
    rng = np.random.default_rng([int(seed), 31])
    labels = np.unique(groups) if groups is not None else np.array([])
    if len(labels) >= 2:
        order = labels[rng.permutation(len(labels))]
        held, count = [], 0
        for label in order[:-1]:
            held.append(label)
            count += int(np.sum(groups == label))
            if count >= fraction * n:
                break
        is_val = np.isin(groups, held)
        how = f"{len(held)} of {len(labels)} groups held out"
    else:
        n_val = min(max(1, round(fraction * n)), n - 1)
        is_val = np.zeros(n, dtype=bool)
        is_val[rng.permutation(n)[:n_val]] = True
        how = f"{n_val} random spots held out"
        log.info("mlp probe: %s; early stopping on %s instead of whole groups",
                 "no groups given" if groups is None else f"only {len(labels)} group", how)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val), how


class MLPProbe:
    """Standardised features -> Linear(hidden) -> ReLU -> Dropout -> Linear(genes), on standardised targets.

    Adam with mini-batches in a seeded order; after every epoch the validation mean squared error (held-out groups,
    `grouped_validation`) is measured, training stops after `patience` epochs without improvement, and the weights
    of the best epoch are kept. Scalers are fitted on the training part only. Runs on the CPU: a probe fits in
    seconds there, and the result does not depend on a GPU's kernels.

    `threads`: torch's CPU threads while fitting (restored after). None: 1 when a batch's first layer is small
    (batch x features x hidden below SMALL_LAYER multiply-adds), where threads only add synchronisation (on a busy
    2-core machine a 600-spot fit took 33 s with 2 threads and 1.2 s with 1), else torch's current setting."""

    kind = "mlp"

    def __init__(self, hidden: int = 256, dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 1e-4,
                 batch_size: int = 256, max_epochs: int = 100, patience: int = 10, val_fraction: float = 0.2,
                 seed: int = 0, threads: int | None = None):
        self.threads = threads
        self.hidden, self.dropout, self.lr, self.weight_decay = hidden, dropout, lr, weight_decay
        self.batch_size, self.max_epochs, self.patience, self.val_fraction = batch_size, max_epochs, patience, val_fraction
        self.seed = seed

    def _check(self) -> None:
        for name in ("hidden", "batch_size", "max_epochs", "patience", "threads"):
            value = getattr(self, name)
            if name == "threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise input_error(f"probe {name}", f"must be a whole number of at least 1, got {value!r}")
        if not 0 <= float(self.dropout) < 1:
            raise input_error("probe dropout", f"must lie in [0, 1), got {self.dropout!r}")
        if not 0 < float(self.val_fraction) < 1:
            raise input_error("probe val_fraction", f"must lie strictly between 0 and 1, got {self.val_fraction!r}")
        if not float(self.lr) > 0 or not float(self.weight_decay) >= 0:
            raise input_error("probe lr", f"lr must be above 0 and weight_decay at least 0, got {self.lr!r}, "
                                          f"{self.weight_decay!r}")

    def fit(self, X, Y, groups=None) -> MLPProbe:
        import torch

        X, Y, groups = check_fit_inputs(X, Y, groups)
        self._check()
        train, val, how = grouped_validation(len(X), groups, float(self.val_fraction), int(self.seed))
        self.x_mean_, self.x_std_ = X[train].mean(axis=0), X[train].std(axis=0)
        self.y_mean_, self.y_std_ = Y[train].mean(axis=0), Y[train].std(axis=0)
        self.x_std_[self.x_std_ == 0] = 1.0
        self.y_std_[self.y_std_ == 0] = 1.0
        xs = torch.from_numpy(((X - self.x_mean_) / self.x_std_).astype(np.float32))
        ys = torch.from_numpy(((Y - self.y_mean_) / self.y_std_).astype(np.float32))
        x_tr, y_tr, x_va, y_va = xs[train], ys[train], xs[val], ys[val]

        threads = self.threads
        if threads is None:
            small = int(self.batch_size) * X.shape[1] * int(self.hidden) < SMALL_LAYER
            threads = 1 if small else torch.get_num_threads()
        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            model, best, best_epoch, epoch = self._train(x_tr, y_tr, x_va, y_va)
        finally:
            torch.set_num_threads(before)
        model.load_state_dict(best)
        self.model_ = model.eval()
        self.dims_ = X.shape[1]
        self.info_ = {"best_epoch": best_epoch + 1, "epochs_run": epoch + 1, "val_mse": self.best_loss_,
                      "validation": how, "n_train": int(len(train)), "n_val": int(len(val)), "threads": int(threads)}
        return self

    def _train(self, x_tr, y_tr, x_va, y_va):
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            model = nn.Sequential(nn.Linear(x_tr.shape[1], int(self.hidden)), nn.ReLU(),
                                  nn.Dropout(float(self.dropout)), nn.Linear(int(self.hidden), y_tr.shape[1]))
            opt = torch.optim.Adam(model.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
            order = torch.Generator().manual_seed(int(self.seed))
            best, best_epoch, best_state, epoch = float("inf"), -1, None, 0
            for epoch in range(int(self.max_epochs)):
                model.train()
                for idx in torch.randperm(len(x_tr), generator=order).split(int(self.batch_size)):
                    opt.zero_grad(set_to_none=True)
                    loss = nn.functional.mse_loss(model(x_tr[idx]), y_tr[idx])
                    loss.backward()
                    opt.step()
                model.eval()
                with torch.no_grad():
                    val_loss = float(nn.functional.mse_loss(model(x_va), y_va))
                if val_loss < best:
                    best, best_epoch = val_loss, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                elif epoch - best_epoch >= int(self.patience):
                    break
        if best_state is None:  # the validation loss was never finite: the training diverged
            raise input_error("mlp probe", "validation loss is not finite from the first epoch; lower lr")
        self.best_loss_ = best
        return model, best_state, best_epoch, epoch

    def predict(self, X) -> np.ndarray:
        import torch

        X = check_features(X, "X", self.dims_)
        with torch.no_grad():
            out = self.model_(torch.from_numpy(((X - self.x_mean_) / self.x_std_).astype(np.float32)))
        return out.double().numpy() * self.y_std_ + self.y_mean_
