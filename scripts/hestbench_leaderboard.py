"""Snakemake entry point for rule `hestbench_leaderboard` (logic in cmrcnet.workflow.hestbench_leaderboard)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - importable without installing

from cmrcnet import workflow

workflow.run(snakemake, workflow.hestbench_leaderboard)  # noqa: F821
