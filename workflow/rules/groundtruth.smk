# Ground truth: one local job per (benchmark, kind) that sends the store's missing shards to the
# launcher (SLURM job array, local processes, or in-process) and blocks until all are done.
# Shards live in <store>/shards/ and are NOT outputs of the rule, so Snakemake never deletes them:
# raising num_subsets re-runs this job, which skips the complete shards and trains only new ones.


rule groundtruth:
    input:
        meta=lambda w: P[w.b]["meta"],
    output:
        f"{R}/{{b}}/groundtruth/{{kind}}/{{h}}/complete-{{n}}.json",
    params:
        spec=spec("groundtruth", kind="kind"),
        store=lambda w: f"{R}/{w.b}/groundtruth/{w.kind}/{w.h}",
    log:
        f"{LOGS}/{{b}}/groundtruth-{{kind}}-{{h}}-{{n}}.log",
    # Where the shards run: the config's `launcher` block (LAUNCHER); a profile overrides it with
    # `set-resources: groundtruth: {launcher: slurm, shard_partition: ..., shard_mem_mb: ...}`.
    # Resources (unlike params) never trigger reruns; the stage gets all of it as one JSON.
    resources:
        **shard_resources(LAUNCHER),
    localrule: True
    run:
        launcher = launcher_settings(LAUNCHER, dict(resources.items())).to_json()
        shell(
            "{TDABENCH} groundtruth --benchmark {wildcards.b} --spec {params.spec:q} "
            "--count {wildcards.n} --store {params.store} --out {output} --log {log} "
            "--launcher {launcher:q}"
        )


rule merge:
    input:
        f"{R}/{{b}}/groundtruth/{{kind}}/{{h}}/complete-{{n}}.json",
    output:
        f"{R}/{{b}}/groundtruth/{{kind}}/{{h}}/merged-{{n}}.parquet",
    params:
        spec=spec("merge", kind="kind"),
    log:
        f"{LOGS}/{{b}}/merge-{{kind}}-{{h}}-{{n}}.log",
    localrule: True
    shell:
        "{TDABENCH} merge --benchmark {wildcards.b} --spec {params.spec:q} "
        "--complete {input} --out {output} --log {log}"
