# CMRCNet pipeline: HEST-1k (or local or synthetic) data -> genes -> folds -> patches -> ...
# Demo on a laptop:   snakemake --cores 2            (config/config.yaml)
# The paper's data:   snakemake --cores 8 --configfile config/paper.yaml
# HEST-Benchmark:     snakemake --cores 8 --configfile config/hestbench.yaml

from snakemake.utils import min_version

min_version("9.0")


# The demo config is the default; a --configfile replaces it rather than merging into it.
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/preprocess.smk"
include: "rules/patches.smk"
include: "rules/weights.smk"
include: "rules/embed.smk"
include: "rules/train.smk"
include: "rules/predict.smk"
include: "rules/evaluate.smk"
include: "rules/figures.smk"
include: "rules/slides.smk"
include: "rules/hestbench.smk"
include: "rules/crossmodal.smk"


rule all:
    default_target: True
    input:
        all_targets(),
