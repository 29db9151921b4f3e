"""Cross-modal benchmark in the spirit of HESCAPE: image encoder x gene encoder x contrastive loss.

Modules: `losses` (contrastive losses as small modules), `gene_towers` / `image_towers` (the two sides of the
`crossmodal` model in `cmrcnet.models.crossmodal`), `retrieval_metrics` (recall and ranks over a whole test split),
`labels` (label classification probes), `batch_effects` (scIB metrics), `grid` (the config block expanded into
methods), `evaluate` and `table` (per-fold scores, the grid table and figures).
"""
