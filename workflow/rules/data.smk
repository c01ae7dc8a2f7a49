# prepare (split identity, noisy labels) and train (reference models) per benchmark.


rule prepare:
    output:
        meta=f"{R}/{{b}}/data/{{h}}/meta.json",
        noisy=f"{R}/{{b}}/data/{{h}}/noisy.parquet",
    params:
        spec=spec("prepare"),
        out_dir=lambda w, output: os.path.dirname(output.meta),
    log:
        f"{LOGS}/{{b}}/prepare-{{h}}.log",
    shell:
        "{TDABENCH} prepare --benchmark {wildcards.b} --spec {params.spec:q} "
        "--out-dir {params.out_dir} --log {log}"


rule train:
    input:
        meta=lambda w: P[w.b]["meta"],
    output:
        directory(f"{R}/{{b}}/models/{{h}}"),
    params:
        spec=spec("train"),
        data=lambda w, input: os.path.dirname(input.meta),
    log:
        f"{LOGS}/{{b}}/train-{{h}}.log",
    shell:
        "{TDABENCH} train --benchmark {wildcards.b} --spec {params.spec:q} --data {params.data} "
        "--out-dir {output} --log {log}"
