"""Snakemake entry point for rule `tables` (logic in cmrcnet.workflow.tables)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.tables)  # noqa: F821
