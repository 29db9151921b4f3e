# Gene selection (per dataset), normalisation (per sample) and cross-validation folds (per dataset).


rule select_genes:
    input:
        st=lambda w: raw_files("st", w),
    output:
        GENES,
    log:
        f"{LOGS}/select_genes/{{dataset}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    script:
        "../scripts/select_genes.py"


rule normalise:
    input:
        st=RAW_ST,
        genes=GENES,
    output:
        NORMALISED,
    log:
        f"{LOGS}/normalise/{{dataset}}/{{sample}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    script:
        "../scripts/normalise.py"


rule folds:
    input:
        metadata=lambda w: raw_files("metadata", w),
    output:
        FOLDS,
    log:
        f"{LOGS}/folds/{{dataset}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    script:
        "../scripts/folds.py"
