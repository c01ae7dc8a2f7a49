# attribute (one job per attributor x benchmark), evaluate (LDS / LOO / AUC of its scores) and,
# where a benchmark lists it in its metrics, brittleness (retrains without top-attributed samples).


rule attribute:
    input:
        meta=lambda w: P[w.b]["meta"],
        noisy=lambda w: P[w.b]["noisy"],
        models=lambda w: P[w.b]["models"],
    output:
        scores=f"{R}/{{b}}/scores/{{method}}/{{h}}/scores.parquet",
        self_scores=f"{R}/{{b}}/scores/{{method}}/{{h}}/self.parquet",
    params:
        spec=spec("attribute", method="method"),
        data=lambda w, input: os.path.dirname(input.meta),
        metrics=lambda w: ",".join(CFG["benchmark_configs"][w.b]["metrics"]),
    log:
        f"{LOGS}/{{b}}/attribute-{{method}}-{{h}}.log",
    shell:
        "{TDABENCH} attribute --benchmark {wildcards.b} --spec {params.spec:q} "
        "--data {params.data} --models {input.models} --metrics {params.metrics} "
        "--out {output.scores} --out-self {output.self_scores} --log {log}"


def _gt_args(w):
    return " ".join(f"--gt {k}={g['merged']}" for k, g in P[w.b]["groundtruth"].items())


rule evaluate:
    input:
        scores=lambda w: P[w.b]["scores"][w.method],
        self_scores=lambda w: P[w.b]["self_scores"][w.method],
        noisy=lambda w: P[w.b]["noisy"],
        gt=lambda w: [g["merged"] for g in P[w.b]["groundtruth"].values()],
    output:
        metrics=f"{R}/metrics/{{b}}/{{method}}.json",
        curves=f"{R}/{{b}}/plots/{{method}}.json",
    params:
        spec=spec("evaluate", method="method"),
        gt=_gt_args,
    log:
        f"{LOGS}/{{b}}/evaluate-{{method}}.log",
    shell:
        "{TDABENCH} evaluate --benchmark {wildcards.b} --spec {params.spec:q} "
        "--scores {input.scores} --self-scores {input.self_scores} {params.gt} "
        "--noisy {input.noisy} --out {output.metrics} --curves-out {output.curves} --log {log}"


rule brittleness:
    input:
        scores=lambda w: P[w.b]["scores"][w.method],
    output:
        out=f"{R}/brittleness/{{b}}/{{method}}.json",
    params:
        spec=spec("brittleness", method="method"),
        store=lambda w: P[w.b]["brittleness"][w.method]["store"],
    log:
        f"{LOGS}/{{b}}/brittleness-{{method}}.log",
    shell:
        "{TDABENCH} brittleness --benchmark {wildcards.b} --spec {params.spec:q} "
        "--scores {input.scores} --store {params.store} --out {output.out} --log {log}"
