"""Snakemake entry point for rule `probe_hestbench` (logic in cmrcnet.workflow.probe_hestbench)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.probe_hestbench)  # noqa: F821
