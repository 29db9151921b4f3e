"""Snakemake entry point for rule `normalise` (logic in cmrcnet.workflow.normalise)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.normalise)  # noqa: F821
