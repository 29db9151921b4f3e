# Inference: every trained model predicts its fold's test samples (retrieval for CMRCNet/BLEEP, regression otherwise).


rule predict:
    input:
        model=MODEL,
        genes=GENES,
        folds=FOLDS,
        st=lambda w: expand(NORMALISED, dataset=w.dataset, sample=samples(w.dataset)),
        patches=lambda w: expand(PATCHES, dataset=w.dataset, sample=samples(w.dataset)),
        weights=method_weights,  # the model is rebuilt with its pretrained_path before its weights are loaded
    output:
        PREDICTIONS,
    log:
        f"{LOGS}/predict/{{dataset}}/{{method}}/fold{{fold}}.log",
    wildcard_constraints:
        method=one_of(TRAINED_METHODS),
    conda:
        "../envs/cmrcnet.yaml"
    threads: PREDICT_RESOURCES["cpus"]
    resources:
        gpu=PREDICT_RESOURCES["gpus"],
        mem_mb=PREDICT_RESOURCES["mem_mb"],
        runtime=PREDICT_RESOURCES["runtime"],
        cpus_per_task=PREDICT_RESOURCES["cpus"],
    params:
        fingerprint=lambda w: run_fingerprint(config, w.dataset, w.method),
    script:
        "../scripts/predict.py"
