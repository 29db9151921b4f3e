"""Model registry: the training loop names a model in the config and gets it from `create_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from cmrcnet.errors import input_error

_MODELS: dict[str, Callable] = {}


def register_model(name: str) -> Callable:
    """Class decorator: make a model buildable by `create_model(name, ...)`."""

    def add(cls: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = cls
        return cls

    return add


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_settings(name: str) -> dict:
    """The config keys a model accepts, with their defaults (for docs and error messages)."""
    params = inspect.signature(_get(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _get(name: str) -> Callable:
    if name not in _MODELS:
        raise input_error(f"model {name!r}", f"unknown model; use one of {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, n_genes: int, **cfg):
    """Build model `name` predicting `n_genes` genes; `cfg` are its keyword settings (see `model_settings`).

    Unknown keys are refused here, so a typo in a config file fails before any training starts.
    """
    cls = _get(name)
    if isinstance(n_genes, bool) or not isinstance(n_genes, int) or n_genes < 1:
        raise input_error(f"model {name!r}", f"n_genes must be a positive integer, got {n_genes!r}")
    known = model_settings(name)
    for key in cfg:
        if key not in known:
            raise input_error(f"model {name!r}", f"unknown setting {key!r}; known: {', '.join(known)}")
    return cls(n_genes, **cfg)
