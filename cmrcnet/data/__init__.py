"""Data stages: sources (HEST download, local, synthetic), genes, folds, slides and patches."""
