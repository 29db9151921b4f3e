# Frozen-encoder features: each sample's patches embedded once per registered encoder (a GPU job on a cluster),
# then the probe methods (model: probe) fitted per fold on those cached embeddings.


rule embed:
    input:
        patches=PATCHES,
        weights=encoder_weights,  # rule fetch_weights (hub or weights.local)
    output:
        EMBEDDINGS,
    log:
        f"{LOGS}/embed/{{dataset}}/{{encoder}}/{{sample}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    threads: PREDICT_RESOURCES["cpus"]
    resources:
        gpu=PREDICT_RESOURCES["gpus"],
        mem_mb=PREDICT_RESOURCES["mem_mb"],
        runtime=PREDICT_RESOURCES["runtime"],
        cpus_per_task=PREDICT_RESOURCES["cpus"],
    params:
        # a change of precision or batch reruns the embedding (rerun-triggers: params)
        settings=lambda w: json.dumps(config["encoders"], sort_keys=True),
    script:
        "../scripts/embed.py"


rule probe:
    input:
        embeddings=probe_embeddings,
        genes=GENES,
        folds=FOLDS,
        st=lambda w: expand(NORMALISED, dataset=w.dataset, sample=samples(w.dataset)),
    output:
        PREDICTIONS,
    log:
        f"{LOGS}/probe/{{dataset}}/{{method}}/fold{{fold}}.log",
    wildcard_constraints:
        method=one_of(PROBE_METHODS),
    conda:
        "../envs/cmrcnet.yaml"
    params:
        fingerprint=lambda w: run_fingerprint(config, w.dataset, w.method),
    script:
        "../scripts/probe.py"
