"""Snakemake entry point for rule `predict_slide` (logic in cmrcnet.workflow.predict_slide)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.predict_slide)  # noqa: F821
