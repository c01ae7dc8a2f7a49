"""``tdabench brittleness``: the fewest top-attributed training samples whose removal flips a test
prediction, for one attributor's verified scores (:class:`tdabench.metric.BrittlenessRunner`).

The retraining uses the ground truth's batched trainer (the setting's recipe) and a keyed,
resumable store of Parquet shards (``results/<b>/brittleness/<method>/<h>/``): a rerun after an
interruption trains only the missing shards. The test points are the first ``num_test`` columns
of the scores that the full model (the same trainer and seed) classifies correctly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from tdabench.errors import ConfigError, DataError
from tdabench.groundtruth.trainer import make_trainer, unstack
from tdabench.metric import BrittlenessRunner
from tdabench.pipeline.io import read_scores, write_json
from tdabench.pipeline.stages._common import data_fingerprint, load, provenance, threads
from tdabench.pipeline.stages._common import device as resolve_device

__all__ = ["brittleness"]


def _correct_columns(
    setting: Any, data: Any, trainer: Any, seed: int, n_cols: int, want: int
) -> list[int]:
    """The first ``want`` of the ``n_cols`` test points the full model of ``seed`` gets right."""
    state = unstack(trainer.train(torch.ones(1, trainer.n_train, dtype=torch.bool), [seed]), 0)
    model = setting.build_model()
    model.load_state_dict({k: v.cpu() for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        pred = model(*[t[:n_cols] for t in data.test[:-1]]).argmax(-1)
    ok = torch.nonzero(pred == data.test[-1][:n_cols]).flatten()[:want]
    if ok.numel() == 0:
        raise DataError(
            "the full model classifies none of the scored test points correctly; nothing can flip"
        )
    return [int(j) for j in ok]


def _runner(setting: Any, trainer: Any, store: str, br: Mapping[str, Any]) -> BrittlenessRunner:
    """The runner: retrains with ``trainer``; a test point counts as right while the retrained
    model's predicted class is its label."""
    template = setting.build_model()

    def predict(state: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits = functional_call(template, state, tuple(batch[:-1]))
        return (logits.argmax(-1) == batch[-1]).to(torch.float32).reshape(())

    return BrittlenessRunner(
        trainer,
        predict,
        store,
        search_space=list(br["search_space"]),
        seed=int(br["seed"]),
        shard_size=int(br["shard_size"]),
    )


def brittleness(
    spec: Mapping[str, Any], benchmark: str, scores: str, out: str, store: str, device: str = "auto"
) -> None:
    """Brittleness of one attributor (see the module docstring); writes ``out`` (stamped JSON).

    Raises:
        IntegrityError / ProvenanceError: the scores are altered or from another configuration.
        DataError: the data changed since the scores were computed.
        ConfigError: a setting without class labels.
    """
    threads()
    s, meta = read_scores(scores, {"benchmark": benchmark, "method": spec["method"]})
    setting, data = load(spec["attribute"]["train"])
    fp = data_fingerprint(data.meta)
    if meta["provenance"].get("data") != fp:
        raise DataError(
            f"{scores!r} was computed on other data than is loaded now; rerun attribute for this data"
        )
    if setting.kind != "classification":
        raise ConfigError(
            f"{setting.name} is a {setting.kind} setting: brittleness needs predicted class labels"
        )
    br = spec["brittleness"]
    trainer = make_trainer(setting, data, batched=True, device=resolve_device(device))
    cols = _correct_columns(
        setting, data, trainer, int(br["seed"]), s.shape[1], int(br["num_test"])
    )
    res = _runner(setting, trainer, store, br).run(np.asarray(s, dtype=np.float64)[:, cols], cols)
    found = [k for k in res["brittleness"] if k is not None]
    entry = {
        "test_indices": cols,
        "brittleness": res["brittleness"],
        "search_space": res["search_space"],
        "n_flipped": len(found),
        "median_flipped_k": float(np.median(found)) if found else None,
    }
    prov = provenance(
        benchmark, "brittleness", spec, data=fp, scores=meta.get("sha256"), store_key=res["key"]
    )
    write_json(
        out,
        {
            "benchmark": benchmark,
            "method": spec["method"],
            "brittleness": entry,
            "provenance": prov,
        },
    )
