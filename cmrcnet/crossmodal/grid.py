"""The `crossmodal` config block expanded into methods: one per image x gene x loss cell of the grid.

Why methods: a cell is then trained per fold, predicted by retrieval and scored in every table exactly like BLEEP
or CMRCNet, on the same folds and patches, so the grid and the paper's models are comparable; the grid's own
judgements (whole-split retrieval, label probes, batch effects) come on top (`cmrcnet.crossmodal.evaluate`).
"""

from __future__ import annotations

import re

from cmrcnet.errors import input_error

GRID_MODEL = "crossmodal"
PREFIX = "xm-"
MODES = ("frozen", "last-blocks", "lora", "scratch")


def parse_image(entry: str) -> tuple[str, str]:
    """"uni" -> ("uni", "frozen"); "uni@lora" -> ("uni", "lora"); a timm name without a mode -> scratch."""
    from cmrcnet.encoders import is_encoder

    name, _, mode = entry.partition("@")
    if not mode:
        mode = "frozen" if is_encoder(name) else "scratch"
    if mode not in MODES:
        raise input_error(f"crossmodal.image ({entry})", f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return name, mode


def cell_name(image: str, mode: str, gene: str, loss: str) -> str:
    """The method name of one cell: xm-<image>[-<mode>]-<gene>-<loss>; the mode is named unless it is the default
    of its image (frozen for a registered encoder, scratch for a timm name)."""
    from cmrcnet.encoders import is_encoder

    default = "frozen" if is_encoder(image) else "scratch"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", image)
    return f"{PREFIX}{slug}{'' if mode == default else '-' + mode}-{gene}-{loss}"


def grid_cells(block: dict) -> list[dict]:
    """Every cell of the block, in config order (image, then gene, then loss): {name, entry (as in `image`),
    image, mode, gene, loss}."""
    cells = []
    for entry in block.get("image") or []:
        image, mode = parse_image(entry)
        for gene in block.get("gene") or []:
            for loss in block.get("loss") or []:
                cells.append({"name": cell_name(image, mode, gene, loss), "entry": entry, "image": image,
                              "mode": mode, "gene": gene, "loss": loss})
    return cells


def cell_method(cell: dict, block: dict, weights_dir: str) -> dict:
    """The method entry of one cell, as a `methods:` entry would be written by hand."""
    from cmrcnet.encoders import is_encoder
    from cmrcnet.weights import weights_file

    own = (block.get("image_params") or {}).get(cell["entry"], {})
    params = {**(block.get("params") or {}), **own, "image": cell["image"], "image_mode": cell["mode"],
              "gene": cell["gene"], "loss": cell["loss"]}
    if is_encoder(cell["image"]) and cell["mode"] != "scratch":
        params["weights_path"] = weights_file(weights_dir, cell["image"])
    return {"model": GRID_MODEL, "paper_name": None, "ablation": False, "recipe": "paper", "params": params,
            "train": dict(block.get("train") or {}), "datasets": block.get("datasets")}


def expand_grid(config: dict, where: str = "config") -> list[str]:
    """Add the grid's methods to config["methods"] (in place, idempotent); returns their names.

    A block with some but not all of image / gene / loss is an error (it would silently run nothing), as is a
    cell whose name a hand-written method already uses.
    """
    block = config.get("crossmodal") or {}
    axes = {axis: block.get(axis) or [] for axis in ("image", "gene", "loss")}
    if not any(axes.values()):
        return []
    empty = [axis for axis, values in axes.items() if not values]
    if empty:
        raise input_error(where, f"crossmodal.{empty[0]}: empty, so the grid has no cell; list at least one "
                                 f"(or remove the crossmodal block)")
    methods = config.setdefault("methods", {})
    weights_dir = (config.get("weights") or {}).get("dir", "weights")
    names = []
    for cell in grid_cells(block):
        entry = cell_method(cell, block, weights_dir)
        name = cell["name"]
        if name in methods and methods[name] != entry:
            raise input_error(where, f"crossmodal: cell {name} has the name of a method in methods:; rename that method")
        if name in names:
            raise input_error(where, f"crossmodal: cell {name} is listed twice")
        methods[name] = entry
        names.append(name)
    return names


def grid_methods(config: dict) -> list[str]:
    """The grid's method names (after expansion), in config order."""
    return [cell["name"] for cell in grid_cells(config.get("crossmodal") or {})]


def grid_encoders(config: dict) -> list[str]:
    """Registered encoders the grid loads weights for (rule fetch_weights)."""
    from cmrcnet.encoders import is_encoder

    names = []
    for entry in (config.get("crossmodal") or {}).get("image") or []:
        image, mode = parse_image(entry)
        if is_encoder(image) and mode != "scratch" and image not in names:
            names.append(image)
    return names
