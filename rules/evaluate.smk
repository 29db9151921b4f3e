# Scoring: every prediction of a dataset under both protocols, then the paper's tables over all datasets.


rule evaluate:
    input:
        predictions=lambda w: [
            PREDICTIONS.format(dataset=w.dataset, method=m, fold=f)
            for m, f in prediction_runs(w.dataset)
        ],
        st=lambda w: expand(NORMALISED, dataset=w.dataset, sample=samples(w.dataset)),
        # predictions record the gene and fold tables they were made from; older ones are refused
        genes=GENES,
        folds=FOLDS,
    output:
        scores=SCORES,
        gene_sets=GENE_SET_TABLE,
        labels=LABELS,
    log:
        f"{LOGS}/evaluate/{{dataset}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    params:
        # a prediction made under another config is refused, not averaged in
        fingerprints=lambda w: fingerprints(w.dataset),
        settings=lambda w: json.dumps(config["evaluation"], sort_keys=True),
    script:
        "../scripts/evaluate.py"


rule tables:
    input:
        scores=expand(SCORES, dataset=DATASETS),
        gene_sets=expand(GENE_SET_TABLE, dataset=DATASETS),
        labels=expand(LABELS, dataset=DATASETS),
        genes=expand(GENES, dataset=DATASETS),  # genes selected per dataset, printed in provenance.json
    output:
        summary=report(
            f"{TABLES}/summary.csv", caption="../report/summary.rst", category="Tables"
        ),
        table1=report(
            f"{TABLES}/table1_top50.csv",
            caption="../report/table1.rst",
            category="Tables",
        ),
        table2=report(
            f"{TABLES}/table2_extended.csv",
            caption="../report/table2.rst",
            category="Tables",
        ),
        table3=report(
            f"{TABLES}/table3_best_genes.csv",
            caption="../report/table3.rst",
            category="Tables",
        ),
        table4=report(
            f"{TABLES}/table4_foundation.csv",
            caption="../report/table4.rst",
            category="Tables",
        ),
        table5=report(
            f"{TABLES}/table5_ablation.csv",
            caption="../report/table5.rst",
            category="Tables",
        ),
        hest_bench=report(
            f"{TABLES}/hest_bench.csv",
            caption="../report/hest_bench.rst",
            category="Tables",
        ),
        wilcoxon=report(
            f"{TABLES}/wilcoxon.csv",
            caption="../report/wilcoxon.rst",
            category="Tables",
        ),
        other=[f"{TABLES}/{name}" for name in TABLE_EXTRAS],
    log:
        f"{LOGS}/tables.log",
    conda:
        "../envs/cmrcnet.yaml"
    params:
        settings=lambda w: json.dumps(
            {
                "evaluation": config["evaluation"],
                "methods": config["methods"],
                "paper_n_genes": {
                    d: config["datasets"][d]["paper_n_genes"] for d in DATASETS
                },
            },
            sort_keys=True,
        ),
    script:
        "../scripts/tables.py"
