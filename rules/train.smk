# One training job per dataset x method x fold; a GPU job on a cluster, a CPU job on a laptop.


rule train:
    input:
        genes=GENES,
        folds=FOLDS,
        st=lambda w: expand(NORMALISED, dataset=w.dataset, sample=samples(w.dataset)),
        patches=lambda w: expand(PATCHES, dataset=w.dataset, sample=samples(w.dataset)),
        weights=method_weights,  # pretrained encoder weights of recipe: original (rule fetch_weights)
    output:
        model=MODEL,
        history=HISTORY,
        summary=TRAIN_SUMMARY,
    log:
        f"{LOGS}/train/{{dataset}}/{{method}}/fold{{fold}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    threads: TRAIN_RESOURCES["cpus"]
    resources:
        gpu=TRAIN_RESOURCES["gpus"],
        mem_mb=TRAIN_RESOURCES["mem_mb"],
        runtime=TRAIN_RESOURCES["runtime"],
        cpus_per_task=TRAIN_RESOURCES["cpus"],
    params:
        # any change here makes Snakemake retrain (rerun-triggers: params)
        settings=lambda w: method_settings(w.method),
    script:
        "../scripts/train.py"
