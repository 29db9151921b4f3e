# Inference: every trained model predicts its fold's test samples (retrieval for CMRCNet/BLEEP, regression otherwise).


rule predict:
    input:
        model=MODEL,
        genes=GENES,
        folds=FOLDS,
        st=lambda w: expand(NORMALISED, dataset=w.dataset, sample=samples(w.dataset)),
        patches=lambda w: expand(PATCHES, dataset=w.dataset, sample=samples(w.dataset)),
    output:
        PREDICTIONS,
    params:
        fingerprint=lambda w: run_fingerprint(config, w.dataset, w.method),
    log:
        f"{LOGS}/predict/{{dataset}}/{{method}}/fold{{fold}}.log",
    threads: PREDICT_RESOURCES["cpus"]
    resources:
        gpu=PREDICT_RESOURCES["gpus"],
        mem_mb=PREDICT_RESOURCES["mem_mb"],
        runtime=PREDICT_RESOURCES["runtime"],
        cpus_per_task=PREDICT_RESOURCES["cpus"],
    conda:
        "../envs/cmrcnet.yaml"
    script:
        "../scripts/predict.py"
