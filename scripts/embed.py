"""Snakemake entry point for rules `embed` and `embed_hestbench` (logic in cmrcnet.workflow.embed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.embed)  # noqa: F821
