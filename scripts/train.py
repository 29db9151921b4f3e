"""Snakemake entry point for rule `train` (logic in cmrcnet.workflow.train)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.train)  # noqa: F821
