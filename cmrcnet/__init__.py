"""CMRCNet pipeline: predict spatial gene expression from H&E slides (HEST-1k), with baselines."""

__version__ = "0.1.0"
