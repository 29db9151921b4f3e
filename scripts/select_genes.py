"""Snakemake entry point for rule `select_genes` (logic in cmrcnet.workflow.select_genes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.select_genes)  # noqa: F821
