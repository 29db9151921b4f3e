# Pretrained encoder weights (recipe: original), fetched once from the Hugging Face hub into {weights.dir}/{name}/.
# A localrule: it runs where Snakemake runs (the login node), since compute nodes are often offline.


localrules:
    fetch_weights,


rule fetch_weights:
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
