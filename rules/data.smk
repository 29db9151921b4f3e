# One rule per data source; each writes the sample's HEST layout under {data_dir}/{dataset}/.


rule synthesize:
    output:
        st=RAW_ST,
        wsi=RAW_WSI,
        metadata=RAW_META,
    log:
        f"{LOGS}/synthesize/{{dataset}}/{{sample}}.log",
    wildcard_constraints:
        dataset=one_of(datasets_by_source(config, "synthetic")),
    conda:
        "../envs/cmrcnet.yaml"
    params:
        root=f"{DATA}/{{dataset}}",
    script:
        "../scripts/synthesize.py"


rule fetch_hest:
    output:
        st=RAW_ST,
        wsi=RAW_WSI,
        metadata=RAW_META,
    log:
        f"{LOGS}/fetch_hest/{{dataset}}/{{sample}}.log",
    wildcard_constraints:
        dataset=one_of(datasets_by_source(config, "hest")),
    retries: 2
    conda:
        "../envs/cmrcnet.yaml"
    resources:
        hest_downloads=1,
    params:
        root=f"{DATA}/{{dataset}}",
    script:
        "../scripts/fetch_hest.py"


rule link_local:
    output:
        st=RAW_ST,
        wsi=RAW_WSI,
        metadata=RAW_META,
    log:
        f"{LOGS}/link_local/{{dataset}}/{{sample}}.log",
    wildcard_constraints:
        dataset=one_of(datasets_by_source(config, "local")),
    conda:
        "../envs/cmrcnet.yaml"
    params:
        root=f"{DATA}/{{dataset}}",
    script:
        "../scripts/link_local.py"
