"""Peer runner: one dattri 0.3.0 attribution job, executed INSIDE the dattri virtualenv.

Usage (compare.py does this): ``.peer-venvs/dattri/bin/python benchmarks/peers/dattri_attribute.py JOB.json``

The job spec (JSON) names the method, the model ("lr" | "mlp"), the hyper-parameters
(benchmarks/common.py METHODS), the checkpoint files, the loader batch sizes and where to
write the result. The runner builds dattri's ``AttributionTask`` and attributor through their
public API only, times ``cache`` + ``attribute`` (setup -- imports, data, task construction --
is not timed), and writes ``scores`` (n_train, n_test) as safetensors plus a JSON result with
the times and this process's peak RSS (/proc VmHWM). Failures are reported in the JSON
(``ok: false``) so the parent can put them in the table instead of crashing.

dattri call shapes used (documented public API, no code copied):
- IF: ``IFAttributor{Explicit,CG,LiSSA,Arnoldi}(task, layer_name, device, **hparams)``;
  ``cache(full_train_loader)``; ``attribute(train_loader, test_loader)``.
- TracIn / Grad-Dot / Grad-Cos: ``TracInAttributor(task, weight_list, normalized_grad,
  projector_kwargs, layer_name, device)``; ``attribute(train_loader, test_loader)``.
- TRAK: ``TRAKAttributor(task, correct_probability_func, projector_kwargs, layer_name, device,
  regularization)``; ``cache(full_train_loader)``; ``attribute(test_loader)`` (test first).
- RPS: ``RPSAttributor(task, final_linear_layer_name, normalize_preactivate, l2_strength,
  epoch, device)`` with ``target_func(pre_activations, labels)``; ``cache``; ``attribute``.
- DataInf: ``dattri.algorithm.influence_function.IFAttributorDataInf(task, layer_name, device,
  regularization, fim_estimate_data_ratio)``; ``cache``; ``attribute(train_loader, test_loader)``.
- LoGra / FactGraSS: ``LoGraAttributor(task, layer_names, hessian, damping, device, proj_dim,
  offload)`` / ``FactGraSSAttributor(..., blowup_factor, ...)`` with dattri's LoGra loss form
  ``loss(model, batch, device)``; ``cache``; ``attribute(train_loader, test_loader)``.
- EK-FAC: ``IFAttributorEKFAC(task, module_name, device, damping)``; ``cache(full_train_loader)``;
  ``attribute(train_loader, test_loader)``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ -> import common

import common
import torch


def build_and_run(job: dict) -> tuple[torch.Tensor, dict]:
    from dattri.task import AttributionTask

    model_name, kind, hp = job["model"], job["kind"], dict(job["hparams"])
    dev = job.get("device", "cpu")  # gpu_compare.py / --device; the attributor moves model and data
    model = common.build_model(model_name)
    model.eval()
    ckpts = common.load_checkpoints(job)
    data = common.load_data(Path(job["cache_dir"]))
    dl = common.loaders(data, job["batches"], job.get("n_test"))
    layer = common.layer_names(model_name, job["layer"])
    loss = common.make_loss_func(model)
    ckpt_arg = ckpts[0] if len(ckpts) == 1 else ckpts
    setup: dict[str, float] = {}

    def start() -> float:  # RSS after setup (imports, data, checkpoints, attributor construction)
        common.warm_torch()
        setup["setup_rss_mb"] = common.peak_rss_mb()[1]
        return time.perf_counter()

    if kind == "datainf":
        from dattri.algorithm.influence_function import IFAttributorDataInf

        task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpt_arg)
        att = IFAttributorDataInf(task=task, layer_name=layer, device=dev, **hp)
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    elif kind in ("logra", "factgrass"):
        from dattri.algorithm import FactGraSSAttributor, LoGraAttributor

        def model_loss(
            m, batch, device
        ):  # dattri's LoGra loss form: f(model, batch, device), batch mean
            x, y = batch
            return torch.nn.functional.cross_entropy(m(x.to(device)), y.to(device))

        # dattri 0.3.0 sets up its compressors with one forward of ``batch[0][0]``, the first
        # sample *without* its batch dimension; a (784,) input breaks its bias-column concat, so
        # the peer's model sees its input reshaped to (-1, 784) (same outputs for batched inputs)
        flat_forward = model.forward
        model.forward = lambda x: flat_forward(x.reshape(-1, x.shape[-1]))
        task = AttributionTask(loss_func=model_loss, model=model, checkpoints=ckpt_arg)
        cls = LoGraAttributor if kind == "logra" else FactGraSSAttributor
        att = cls(task=task, layer_names=layer, device=dev, **hp)
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    elif kind.startswith("if_"):
        from dattri.algorithm import (
            IFAttributorArnoldi,
            IFAttributorCG,
            IFAttributorExplicit,
            IFAttributorLiSSA,
        )

        cls = {
            "if_explicit": IFAttributorExplicit,
            "if_cg": IFAttributorCG,
            "if_lissa": IFAttributorLiSSA,
            "if_arnoldi": IFAttributorArnoldi,
        }[kind]
        task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpt_arg)
        att = cls(task=task, layer_name=layer, device=dev, **hp)
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    elif kind in ("tracin", "grad_dot", "grad_cos"):
        from dattri.algorithm import TracInAttributor

        task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpt_arg)
        weights = torch.tensor(job["checkpoint_weights"], dtype=torch.float32)
        att = TracInAttributor(
            task=task,
            weight_list=weights,
            normalized_grad=hp["normalized_grad"],
            projector_kwargs={**hp["projector_kwargs"], "device": dev},
            layer_name=layer,
            device=dev,
        )
        t0 = t1 = start()
        scores = att.attribute(dl["train"], dl["test"])
    elif kind == "trak":
        from dattri.algorithm import TRAKAttributor

        task = AttributionTask(
            loss_func=common.make_margin_func(model), model=model, checkpoints=ckpt_arg
        )
        att = TRAKAttributor(
            task=task,
            correct_probability_func=common.make_prob_func(model),
            projector_kwargs={**hp["projector_kwargs"], "device": dev},
            layer_name=layer,
            device=dev,
            regularization=hp["regularization"],
        )
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["test"])  # dattri: test loader first; train side from the cache
    elif kind == "rps":
        from dattri.algorithm import RPSAttributor

        task = AttributionTask(
            loss_func=loss, model=model, checkpoints=ckpt_arg, target_func=common.rps_target_func
        )
        att = RPSAttributor(
            task=task, final_linear_layer_name=common.FINAL_LAYER[model_name], device=dev, **hp
        )
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    elif (
        kind == "ekfac"
    ):  # IFAttributorEKFAC(task, module_name, device, damping): all Linear modules
        from dattri.algorithm import IFAttributorEKFAC

        task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpt_arg)
        att = IFAttributorEKFAC(
            task=task, module_name=None, device="cpu", damping=float(hp.get("damping", 0.0))
        )
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    else:
        raise ValueError(f"unknown method kind {kind!r}")
    common.sync_device(dev)
    t2 = time.perf_counter()
    times = {"time_cache": t1 - t0, "time_attribute": t2 - t1, "time_total": t2 - t0, **setup}
    return scores, times


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: dattri_attribute.py JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    common.one_thread()
    result: dict = {"side": "dattri", "method": job["method"], "model": job["model"], "ok": False}
    try:
        import dattri

        result["version"] = getattr(dattri, "__version__", "0.3.0")
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
