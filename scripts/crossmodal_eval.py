"""Snakemake entry point for rule `crossmodal_eval` (logic in cmrcnet.workflow.crossmodal_eval)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.crossmodal_eval)  # noqa: F821
