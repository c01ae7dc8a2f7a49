# The report: a table (method x benchmark) and plots from every metrics file.


def _metric_args(wildcards):
    return " ".join(
        f"--metrics {b}:{m}={path}" for b in BENCHMARKS for m, path in P[b]["metrics"].items()
    )


rule report:
    input:
        pulled([path for b in BENCHMARKS for path in P[b]["metrics"].values()]),
    output:
        md=f"{R}/report.md",
        html=f"{R}/report.html",
        summary=f"{R}/summary.csv",
        plots=directory(f"{R}/plots"),
    params:
        spec=json.dumps(stage_spec(CFG, "report"), sort_keys=True),
        metrics=_metric_args,
    log:
        f"{LOGS}/report.log",
    localrule: True
    shell:
        "{TDABENCH} report --spec {params.spec:q} {params.metrics} --out-md {output.md} "
        "--out-html {output.html} --plots-dir {output.plots} --summary {output.summary} --log {log}"
