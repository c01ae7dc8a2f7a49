# tdabench workflow: configs/ say what to compute, workflow/profiles/ say where it runs.
#   snakemake --cores all                  # everything in configs/default.yaml, on this machine
#   snakemake --profile slurm              # the same on a SLURM cluster (see README.md, "The benchmark pipeline")
#   snakemake -n                           # what would run (nothing after `dvc pull`)
# Rules are thin: inputs, outputs, params, log, and one `tdabench <stage>` command.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # this checkout's code, installed or not


configfile: "configs/default.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/groundtruth.smk"
include: "workflow/rules/attribution.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        REPORT,
        BRITTLENESS,
        [f for b in BENCHMARKS for f in outputs(b, "data", "models", "groundtruth", "scores", "metrics")],
