"""Snakemake entry point for rule `fetch_weights` (logic in cmrcnet.workflow.fetch_weights)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.fetch_weights)  # noqa: F821
