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
    params:
        # a change of any of these redoes the selection (paper_n_genes only adds a log line: not listed)
        settings=lambda w: json.dumps(
            {
                "genes": config["genes"],
                **{
                    k: config["datasets"][w.dataset].get(k)
                    for k in (
                        "gene_selection",
                        "marker_genes",
                        "panel_controls",
                        "control_probe_patterns",
                    )
                },
            },
            sort_keys=True,
        ),
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
    params:
        settings=lambda w: json.dumps(
            {
                "normalise": config["normalise"],
                "spots": config["datasets"][w.dataset]["spots"],
            },
            sort_keys=True,
        ),
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
    params:
        # the scheme and the config's patients decide the folds: a change redoes them and everything after
        settings=lambda w: json.dumps(
            {
                "scheme": config["datasets"][w.dataset]["folds_scheme"],
                "patients": config["datasets"][w.dataset]["patients"],
                "samples": samples(w.dataset),
            },
            sort_keys=True,
        ),
    script:
        "../scripts/folds.py"
