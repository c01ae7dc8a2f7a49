"""Stage bodies: thin calls into the tdabench library, one module per ``tdabench <stage>``.

Each stage receives its spec (see :func:`tdabench.pipeline.config.stage_spec`) and explicit
input/output paths, verifies its inputs (checksums and provenance, :mod:`tdabench._io`), calls the
library and writes stamped outputs atomically:

* :mod:`.prepare` -- split identity and noisy labels;
* :mod:`.train` -- reference models (:mod:`tdabench.groundtruth.reference`);
* :mod:`.groundtruth` -- retraining shards through the launcher; :mod:`.merge` -- one file;
* :mod:`.attribute` -- scores (attributors built by :mod:`.attributor` from their config);
* :mod:`.evaluate` -- LDS / LOO / AUC; :mod:`.brittleness` -- removals that flip a prediction;
  :mod:`.report` -- the report renderer.

``TDABENCH_STAGES`` may name another module with the same functions (the pipeline's tests use
``toy_stages`` from ``tests/pipeline``).
"""

from __future__ import annotations

from tdabench.pipeline.stages.attribute import attribute
from tdabench.pipeline.stages.brittleness import brittleness
from tdabench.pipeline.stages.evaluate import evaluate
from tdabench.pipeline.stages.groundtruth import (
    GroundTruthShard,
    groundtruth,
    num_shards,
    run_shards,
)
from tdabench.pipeline.stages.merge import merge
from tdabench.pipeline.stages.prepare import prepare
from tdabench.pipeline.stages.report import report
from tdabench.pipeline.stages.train import train

__all__ = [
    "GroundTruthShard",
    "attribute",
    "brittleness",
    "evaluate",
    "groundtruth",
    "merge",
    "num_shards",
    "prepare",
    "report",
    "run_shards",
    "train",
]
