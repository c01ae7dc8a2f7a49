"""Peer runner: one kronfluence 1.0.1 EK-FAC / K-FAC job, executed INSIDE the kronfluence virtualenv.

Usage (benchmarks/ekfac_compare.py does this)::

    /work/peers/kron/bin/python benchmarks/peers/kronfluence_attribute.py JOB.json

Black box, public API only (read to learn the call shapes; nothing copied): a ``Task`` subclass
with ``compute_train_loss(batch, model, sample)`` (summed cross-entropy; with ``sample=True`` the
labels are drawn from the model's softmax, kronfluence's true Fisher) and
``compute_measurement(batch, model)`` (summed cross-entropy of the query, so a positive score
means the training sample helps, as in tdabench); ``prepare_model``; ``Analyzer(cpu=True)``;
``fit_all_factors(factor_args=FactorArguments(strategy=..., use_empirical_fisher=...))``;
``compute_pairwise_scores(score_args=ScoreArguments(damping_factor=...))`` (``None`` = its
heuristic 0.1 x mean eigenvalue); ``load_pairwise_scores(...)["all_modules"]`` ``(n_test, n_train)``,
returned transposed to ``(n_train, n_test)``. The timed region is ``fit_all_factors`` +
``compute_pairwise_scores`` (factors written to and read from its output directory included).

Job fields used: ``model``, ``hparams`` (``strategy``, ``damping_factor``, ``use_empirical_fisher``),
``batches`` (``cache`` = factor batch size, ``train``, ``test``), ``checkpoint_paths`` (one),
``cache_dir``, ``n_test``, ``scores_path``, ``result_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ -> import common

import common
import torch
import torch.nn.functional as F


def _task_class():
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(
                        torch.softmax(logits.detach(), dim=-1), num_samples=1
                    ).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return ClassificationTask


def build_and_run(job: dict) -> tuple[torch.Tensor, dict]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    hp = dict(job["hparams"])
    model = common.build_model(job["model"])
    model.load_state_dict(common.load_checkpoints(job)[0])
    model.eval()
    data = common.load_data(Path(job["cache_dir"]))
    nt = job.get("n_test") or common.N_TEST
    train = TensorDataset(data["x_train"], data["y_train"])
    test = TensorDataset(data["x_test"][:nt], data["y_test"][:nt])
    task = _task_class()()
    model = prepare_model(model, task)
    out_dir = tempfile.mkdtemp(prefix="kron-", dir=str(Path(job["result_path"]).parent))
    analyzer = Analyzer(
        analysis_name="mnist",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=out_dir,
    )
    factor_args = FactorArguments(
        strategy=hp["strategy"], use_empirical_fisher=bool(hp.get("use_empirical_fisher", False))
    )
    score_args = ScoreArguments(damping_factor=hp.get("damping_factor", 1e-8))
    common.warm_torch()
    setup_rss = common.peak_rss_mb()[1]
    t0 = time.perf_counter()
    analyzer.fit_all_factors(
        factors_name="f",
        dataset=train,
        per_device_batch_size=int(job["batches"]["cache"]),
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    t1 = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name="s",
        factors_name="f",
        query_dataset=test,
        train_dataset=train,
        per_device_query_batch_size=int(job["batches"]["test"]),
        per_device_train_batch_size=int(job["batches"]["train"]),
        score_args=score_args,
        overwrite_output_dir=True,
    )
    t2 = time.perf_counter()
    scores = analyzer.load_pairwise_scores("s")["all_modules"].T.contiguous()
    shutil.rmtree(out_dir, ignore_errors=True)
    return scores, {
        "time_cache": t1 - t0,
        "time_attribute": t2 - t1,
        "time_total": t2 - t0,
        "setup_rss_mb": setup_rss,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: kronfluence_attribute.py JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    common.one_thread()
    result: dict = {
        "side": "kronfluence",
        "method": job["method"],
        "model": job["model"],
        "ok": False,
    }
    try:
        import kronfluence

        result["version"] = getattr(kronfluence, "__version__", "1.0.1")
        result["torch"] = torch.__version__
        scores, times = build_and_run(job)
        result.update(times)
        result["ok"] = True
        common.finish_job(job, result, scores)
        return 0
    except Exception as exc:  # reported in the table, not fatal for the harness
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
        common.finish_job(job, result, None)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
