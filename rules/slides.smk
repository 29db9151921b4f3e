# Expression maps on whole slides without spatial transcriptomics: config `predict_slides`, one job per slide.


rule predict_slide:
    input:
        model=slide_model,
        slide=lambda w: PREDICT_SLIDES[w.slide]["slide"],
        tissue=lambda w: PREDICT_SLIDES[w.slide]["tissue"] or [],
    output:
        adata=SLIDE_PREDICTION,
        maps=multiext(SLIDE_MAPS, ".png", ".pdf"),
    log:
        f"{LOGS}/predict_slide/{{slide}}.log",
    conda:
        "../envs/cmrcnet.yaml"
    threads: PREDICT_RESOURCES["cpus"]
    resources:
        gpu=PREDICT_RESOURCES["gpus"],
        mem_mb=PREDICT_RESOURCES["mem_mb"],
        runtime=PREDICT_RESOURCES["runtime"],
        cpus_per_task=PREDICT_RESOURCES["cpus"],
    params:
        settings=lambda w: slide_settings(w.slide),
    script:
        "../scripts/predict_slide.py"
