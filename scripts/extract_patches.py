"""Snakemake entry point for rule `extract_patches` (logic in cmrcnet.workflow.extract_patches)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.extract_patches)  # noqa: F821
