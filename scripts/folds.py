"""Snakemake entry point for rule `folds` (logic in cmrcnet.workflow.folds)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.folds)  # noqa: F821
