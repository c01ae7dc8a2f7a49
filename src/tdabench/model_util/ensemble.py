"""Model ensembles (dattri's ``model_util.ensemble``; that module is empty in dattri 0.3.0).

An ensemble is a list of checkpoints given to ``AttributionTask(..., checkpoints=[...])``.
Besides independently trained models (TRAK-k: train k models on random halves), one trained
model yields a deterministic dropout-mask ensemble with :func:`dropout_checkpoints`.
"""

from __future__ import annotations

from tdabench.model_util.dropout import dropout_checkpoints, dropout_masks

__all__ = ["dropout_checkpoints", "dropout_masks"]
