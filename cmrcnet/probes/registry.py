"""The probe kinds by name, and `make_probe`."""

from __future__ import annotations

import inspect

from cmrcnet.errors import input_error
from cmrcnet.probes.knn import KNNProbe
from cmrcnet.probes.mlp import MLPProbe
from cmrcnet.probes.ridge import RidgeCV, RidgeHestBench

PROBES = {"ridge-hestbench": RidgeHestBench, "ridge-cv": RidgeCV, "mlp": MLPProbe, "knn": KNNProbe}


def _probe_class(kind: str):
    if kind not in PROBES:
        raise input_error("probe", f"unknown probe {kind!r}; use one of {', '.join(PROBES)}")
    return PROBES[kind]


def probe_params(kind: str) -> list[str]:
    """The parameters a probe kind accepts."""
    return [p for p in inspect.signature(_probe_class(kind).__init__).parameters if p != "self"]


def make_probe(kind: str, **params):
    """A new, unfitted probe of `kind` with `params` (unknown names are a one-line error listing the known)."""
    cls = _probe_class(kind)
    known = probe_params(kind)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise input_error(f"probe {kind}", f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**params)
