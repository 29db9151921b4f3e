# The paper's figures for each dataset, and the training curves, each PNG captioned in the HTML report.


rule figures:
    input:
        predictions=lambda w: [
            PREDICTIONS.format(dataset=w.dataset, method=m, fold=f)
            for m, f in prediction_runs(w.dataset)
        ],
        scores=SCORES,
        gene_sets=GENE_SET_TABLE,
        labels=LABELS,
        histories=lambda w: [
            HISTORY.format(dataset=w.dataset, method=m, fold=FOLD_IDS[w.dataset][0])
            for m in figure_methods(w.dataset)
        ],
        wsis=lambda w: raw_files("wsis", w),
    output:
        fig2=figure_output("fig2_boxplots", "fig2"),
        fig3=figure_output("fig3_mean_variance", "fig3"),
        fig4_heg=figure_output("fig4_heatmaps_heg", "fig4"),
        fig4_hvg=figure_output("fig4_heatmaps_hvg", "fig4"),
        fig5=figure_output("fig5_spatial", "fig5"),
        curves=figure_output("training_curves", "curves"),
        pdfs=expand(f"{FIGURES}/{{name}}.pdf", name=FIGURE_NAMES, allow_missing=True),
    log:
        f"{LOGS}/figures/{{dataset}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    params:
        history_names=lambda w: figure_methods(w.dataset),
        gene=lambda w: config["datasets"][w.dataset]["figure_gene"],
    script:
        "../scripts/figures.py"
