# The report: a table (method x benchmark), plots and provenance from every metrics and curves file.
# Every file the report reads is an input, so a changed, rebuilt or deleted one reruns it.


GT_COMPLETE = {f"{b}/{k}": g["complete"] for b in BENCHMARKS for k, g in P[b]["groundtruth"].items()}


def _report_args(wildcards):
    args = [
        f"--metrics {b}:{m}={path} --curves {b}:{m}={P[b]['curves'][m]}"
        for b in BENCHMARKS
        for m, path in P[b]["metrics"].items()
    ]
    return " ".join(args + [f"--gt-complete {k}={v}" for k, v in GT_COMPLETE.items()])


# Provenance shown in the report: which config files, and how each hyper-parameter was chosen.
REPORT_CONTEXT = {
    "configfiles": ["configs/default.yaml"]
    + [str(f) for f in workflow.configfiles if not str(f).endswith("configs/default.yaml")],
    "hyperparameters": {
        a: {
            "params": CFG["attributor_configs"][a]["params"],
            "chosen": f"fixed in configs/attributors/{a}.yaml (not tuned on the evaluation ground truth)",
        }
        for a in sorted({m for b in BENCHMARKS for m in P[b]["metrics"]})
    },
}


rule report:
    input:
        metrics=[path for b in BENCHMARKS for path in P[b]["metrics"].values()],
        curves=[path for b in BENCHMARKS for path in P[b]["curves"].values()],
        groundtruth=list(GT_COMPLETE.values()),
    output:
        md=f"{R}/report.md",
        html=f"{R}/report.html",
        summary=f"{R}/summary.csv",
        plots=directory(f"{R}/plots"),
    params:
        spec=json.dumps(stage_spec(CFG, "report"), sort_keys=True),
        inputs=_report_args,
        context=json.dumps(REPORT_CONTEXT, sort_keys=True),
    log:
        f"{LOGS}/report.log",
    localrule: True
    shell:
        "{TDABENCH} report --spec {params.spec:q} {params.inputs} --context {params.context:q} --out-md {output.md} "
        "--out-html {output.html} --plots-dir {output.plots} --summary {output.summary} --log {log}"
