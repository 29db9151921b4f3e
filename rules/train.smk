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
    wildcard_constraints:
        method=one_of(TRAINED_METHODS),
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


# The deployable model of a dataset x method: the same training on every sample (fold `all`, validation split as
# configured), its best.pt carrying the reference bank a retrieval model predicts new slides with.
use rule train as train_deployable with:
    output:
        model=DEPLOYABLE,
        history=f"{DEPLOY_RUN}/history.csv",
        summary=f"{DEPLOY_RUN}/train.json",
    log:
        f"{LOGS}/train/{{dataset}}/{{method}}/all.log",
    params:
        settings=lambda w: method_settings(w.method),
        fold="all",


rule deploy:
    input:
        deployable_models(),
