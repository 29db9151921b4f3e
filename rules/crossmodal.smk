# The cross-modal grid (config `crossmodal`): its cells are methods (trained, predicted and scored like BLEEP),
# judged here per fold on retrieval over the whole test split, expression prediction, labels and batch effects.


rule crossmodal_eval:
    input:
        model=MODEL,
        weights=method_weights,  # the image tower is rebuilt from its encoder's weights before loading the model
        genes=GENES,
        folds=FOLDS,
        st=lambda w: expand(NORMALISED, dataset=w.dataset, sample=samples(w.dataset)),
        patches=lambda w: expand(PATCHES, dataset=w.dataset, sample=samples(w.dataset)),
        metadata=lambda w: raw_files("metadata", w),  # per-sample labels (labels.sample_metadata_key)
    output:
        result=CROSSMODAL_RESULT,
        joint=CROSSMODAL_JOINT,
    log:
        f"{LOGS}/crossmodal_eval/{{dataset}}/{{method}}/fold{{fold}}.log",
    wildcard_constraints:
        method=one_of(GRID_METHODS),
    conda:
        "../envs/cmrcnet.yaml"
    threads: PREDICT_RESOURCES["cpus"]
    resources:
        gpu=PREDICT_RESOURCES["gpus"],
        mem_mb=PREDICT_RESOURCES["mem_mb"],
        runtime=PREDICT_RESOURCES["runtime"],
        cpus_per_task=PREDICT_RESOURCES["cpus"],
    params:
        # a change of the block or of the evaluation settings rescores (rerun-triggers: params)
        settings=lambda w: json.dumps(
            [config["crossmodal"], config["evaluation"]], sort_keys=True
        ),
    script:
        "../scripts/crossmodal_eval.py"


rule crossmodal_table:
    input:
        results=crossmodal_results(),
    output:
        csv=report(
            f"{TABLES}/crossmodal.csv",
            caption="../report/crossmodal.rst",
            category="Cross-modal grid",
        ),
        md=f"{TABLES}/crossmodal.md",
    log:
        f"{LOGS}/crossmodal_table.log",
    conda:
        "../envs/cmrcnet.yaml"
    params:
        settings=json.dumps(config["crossmodal"], sort_keys=True),
    script:
        "../scripts/crossmodal_table.py"


rule crossmodal_figures:
    input:
        table=f"{TABLES}/crossmodal.csv",
        joints=lambda w: crossmodal_joints(w.dataset),
    output:
        grid=report(
            f"{FIGURES}/crossmodal_grid.png",
            caption="../report/crossmodal_grid.rst",
            category="Cross-modal grid",
            subcategory="{dataset}",
        ),
        grid_pdf=f"{FIGURES}/crossmodal_grid.pdf",
        umap=report(
            f"{FIGURES}/crossmodal_umap.png",
            caption="../report/crossmodal_umap.rst",
            category="Cross-modal grid",
            subcategory="{dataset}",
        ),
        umap_pdf=f"{FIGURES}/crossmodal_umap.pdf",
    log:
        f"{LOGS}/crossmodal_figures/{{dataset}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    params:
        methods=lambda w: grid_methods_for(w.dataset),
    script:
        "../scripts/crossmodal_figures.py"
