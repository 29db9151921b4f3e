# HEST-Benchmark as published (config/hestbench.yaml): the benchmark's own task files (splits, patches, 50 genes)
# from the hub, every encoder's embeddings, every probe per task, and the leaderboard beside the published numbers.


localrules:
    fetch_hestbench,
    hestbench_leaderboard,


# A checkpoint: a task's samples are known once its files (and TASK.json, their manifest) are here.
checkpoint fetch_hestbench:
    output:
        task=BENCH_TASK,
    log:
        f"{LOGS}/hestbench/fetch/{{task}}.log",
    retries: 2
    conda:
        "../envs/cmrcnet.yaml"
    params:
        root=lambda w, output: str(Path(output.task).parent.parent),
    script:
        "../scripts/fetch_hestbench.py"


rule embed_hestbench:
    input:
        patches=bench_patches,
        weights=encoder_weights,
    output:
        BENCH_EMBEDDINGS,
    log:
        f"{LOGS}/hestbench/embed/{{task}}/{{encoder}}/{{bench_sample}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    threads: PREDICT_RESOURCES["cpus"]
    resources:
        gpu=PREDICT_RESOURCES["gpus"],
        mem_mb=PREDICT_RESOURCES["mem_mb"],
        runtime=PREDICT_RESOURCES["runtime"],
        cpus_per_task=PREDICT_RESOURCES["cpus"],
    params:
        settings=lambda w: json.dumps(config["encoders"], sort_keys=True),
    script:
        "../scripts/embed.py"


rule probe_hestbench:
    input:
        task=BENCH_TASK,
        embeddings=lambda w: expand(
            BENCH_EMBEDDINGS,
            task=w.task,
            encoder=w.encoder,
            bench_sample=bench_samples(w.task),
        ),
    output:
        BENCH_RESULT,
    log:
        f"{LOGS}/hestbench/probe/{{task}}/{{encoder}}/{{probe}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    params:
        samples=lambda w: bench_samples(w.task),
        settings=lambda w: json.dumps(
            [HESTBENCH["seed"], HESTBENCH["probe_params"].get(w.probe)], sort_keys=True
        ),
    script:
        "../scripts/probe_hestbench.py"


rule hestbench_leaderboard:
    input:
        results=expand(
            BENCH_RESULT,
            task=HESTBENCH["tasks"],
            encoder=BENCH_ENCODERS,
            probe=HESTBENCH["probes"],
        ),
    output:
        csv=report(
            f"{LEADERBOARD}.csv",
            caption="../report/hestbench_leaderboard.rst",
            category="Tables",
        ),
        md=f"{LEADERBOARD}.md",
    log:
        f"{LOGS}/hestbench/leaderboard.log",
    conda:
        "../envs/cmrcnet.yaml"
    params:
        source=HESTBENCH["published_source"],
    script:
        "../scripts/hestbench_leaderboard.py"
