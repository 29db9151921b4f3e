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
    script:
        "../scripts/extract_patches.py"
