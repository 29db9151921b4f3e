"""Paper figures (PNG + PDF) from in-memory results: box plots, mean/variance, correlation heatmaps, spatial maps,
training curves. Every plotting function writes `{out_base}.png` and `{out_base}.pdf` atomically."""

from cmrcnet.figures.boxplots import boxplots
from cmrcnet.figures.common import check_gene, save_figure
from cmrcnet.figures.curves import training_curves
from cmrcnet.figures.heatmaps import cluster_order, correlation_heatmaps, correlation_matrix
from cmrcnet.figures.mean_variance import mean_variance
from cmrcnet.figures.spatial import spatial_maps
from cmrcnet.figures.thumbnail import read_thumbnail

__all__ = [
    "boxplots", "check_gene", "cluster_order", "correlation_heatmaps", "correlation_matrix", "mean_variance",
    "read_thumbnail", "save_figure", "spatial_maps", "training_curves",
]
