# Patch extraction per sample: HEST-layout HDF5 of 224x224 patches plus a per-spot Parquet table.


rule extract_patches:
    input:
        wsi=RAW_WSI,
        st=RAW_ST,
        metadata=RAW_META,
    output:
        h5=PATCHES,
        spots=SPOTS,
    log:
        f"{LOGS}/extract_patches/{{dataset}}/{{sample}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    params:
        settings=lambda w: json.dumps(
            {
                "patches": config["patches"],
                "spots": config["datasets"][w.dataset]["spots"],
            },
            sort_keys=True,
        ),
    script:
        "../scripts/extract_patches.py"
