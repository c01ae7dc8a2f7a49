"""``tdabench train``: the reference models (ensemble, TracIn checkpoints, noisy-label model).

The training itself is the library's :func:`tdabench.groundtruth.reference.train_reference_models`;
this stage verifies its inputs, saves each checked state as stamped safetensors in a temporary
directory and publishes the directory (manifest included) in one rename: a failed or diverged run
leaves nothing behind, by hand as under Snakemake.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tdabench._io import atomic_dir, write_safetensors
from tdabench.groundtruth.reference import train_reference_models
from tdabench.pipeline.io import write_json, write_sidecar
from tdabench.pipeline.stages._common import (
    check_data,
    load,
    provenance,
    read_noisy,
    threads,
)
from tdabench.pipeline.stages._common import device as resolve_device

__all__ = ["train"]


def train(
    spec: Mapping[str, Any],
    data_dir: str,
    out_dir: str,
    device: str = "auto",
    benchmark: str | None = None,
) -> None:
    """Train the reference models: ``ensemble`` clean models with ``checkpoints`` snapshots of
    model 0, plus the same recipe on the noisy labels (classification only).

    Writes ``<out_dir>/{clean,noisy}-<k>-ckpt<j>.safetensors`` (j = 0..checkpoints-1, last =
    final; each stamped with ``tensors_sha256`` and the provenance) and ``<out_dir>/manifest.json``
    (file names, their checksums, epochs, seeds, provenance).

    Raises:
        NonFiniteError: a model diverged (NaN/inf or huge weights); nothing is written.
        IntegrityError / ProvenanceError / DataError: the prepared data is altered or stale.
    """
    threads()
    dev = resolve_device(device)
    setting, data = load(spec)
    fp = check_data(spec["prepare"], data, data_dir, benchmark)
    noisy = read_noisy(Path(data_dir) / "noisy.parquet", benchmark, fp, len(data.train[1]))
    noisy_labels = torch.as_tensor(noisy.column("noisy_label").to_numpy().copy())
    t = spec["train"]
    prov = provenance(benchmark, "train", spec, data=fp)
    files: dict[str, list[list[str]]] = {"clean": [], "noisy": []}
    checksums: dict[str, str] = {}
    with atomic_dir(out_dir) as tmp:

        def save(variant: str, k: int, j: int, state: dict[str, Any], epoch: int) -> None:
            name = f"{variant}-{k}-ckpt{j}.safetensors"
            checksums[name] = write_safetensors(tmp / name, state, {"epochs": epoch}, prov)
            per_model = files[variant]
            while len(per_model) <= k:
                per_model.append([])
            per_model[k].append(name)

        ref = train_reference_models(
            setting,
            data,
            ensemble=t["ensemble"],
            checkpoints=t["checkpoints"],
            seed=t["seed"],
            # the label-noise variant (mislabel detection) exists for classification only
            noisy_labels=noisy_labels if setting.kind == "classification" else None,
            device=dev,
            on_checkpoint=save,
        )
        manifest = {
            "spec": dict(spec),
            "epochs": ref.epochs,
            "files": files,
            "checksums": checksums,
            "seeds": ref.seeds,
            "provenance": prov,
        }
        write_json(tmp / "manifest.json", manifest)
    write_sidecar(Path(out_dir) / "manifest.json")
