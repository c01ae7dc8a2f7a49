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
    # Where the shards run. Defaults come from the config's `launcher` block; a profile overrides
    # them with `set-resources: groundtruth: {launcher: slurm, shard_partition: ..., ...}`.
    # Resources (unlike params) never trigger reruns, and `--config` on the command line does not
    # replace them.
    resources:
        **LAUNCHER_RESOURCES,
    localrule: True
    shell:
        "{TDABENCH} groundtruth --benchmark {wildcards.b} --spec {params.spec:q} "
        "--count {wildcards.n} --store {params.store} --out {output} --log {log} "
        "--launcher-set kind={resources.launcher} "
        "--launcher-set array_parallelism={resources.launcher_parallelism} "
        "--launcher-set max_retries={resources.launcher_retries} "
        "--launcher-set slurm.partition={resources.shard_partition:q} "
        "--launcher-set slurm.account={resources.shard_account:q} "
        "--launcher-set slurm.gpus_per_node={resources.shard_gpus} "
        "--launcher-set slurm.cpus_per_task={resources.shard_cpus} "
        "--launcher-set slurm.mem_gb={resources.shard_mem_mb}/1024 "
        "--launcher-set slurm.timeout_min={resources.shard_runtime}"


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
