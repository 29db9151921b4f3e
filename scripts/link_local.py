"""Snakemake entry point for rule `link_local` (logic in cmrcnet.workflow.link_local)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.link_local)  # noqa: F821
