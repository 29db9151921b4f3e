"""Snakemake entry point for rule `probe` (logic in cmrcnet.workflow.probe)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.probe)  # noqa: F821
