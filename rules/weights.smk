# Pretrained weights, fetched once from the Hugging Face hub into {weights.dir}/{name}/model.safetensors: timm weights
# (recipe: original) and registered frozen encoders (cmrcnet.encoders: probes, HEST-Benchmark), or imported from a
# local file (weights.local).
# A localrule: it runs where Snakemake runs (the login node), since compute nodes are often offline.


localrules:
    fetch_weights,


rule fetch_weights:
    input:
        # a local weight file (weights.local) is imported instead of fetched
        local=lambda w: config["weights"]["local"].get(w.name, []),
    output:
        weights=WEIGHTS_FILE,
        source=WEIGHTS_SOURCE,
    log:
        f"{LOGS}/fetch_weights/{{name}}.log",
    wildcard_constraints:
        name=one_of(WEIGHT_NAMES),
    retries: 2
    conda:
        "../envs/cmrcnet.yaml"
    params:
        revision=lambda w: config["weights"]["revisions"].get(w.name),
    script:
        "../scripts/fetch_weights.py"


# The demo's encoder: seeded random weights of the registered `tiny-test` ViT, written locally (no hub), then
# imported by fetch_weights like any local file (weights.local: {tiny-test: <this file>}).
rule tiny_test_weights:
    output:
        f"{DATA}/encoders/tiny-test-seed{{seed}}.pt",
    log:
        f"{LOGS}/tiny_test_weights/seed{{seed}}.log",
    wildcard_constraints:
        seed=r"\d+",
    conda:
        "../envs/cmrcnet.yaml"
    script:
        "../scripts/tiny_test_weights.py"
