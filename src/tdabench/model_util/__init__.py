"""Model utilities: dropout switches and dropout-mask ensembles."""

from tdabench.model_util.dropout import activate_dropout, dropout_checkpoints, dropout_masks

__all__ = ["activate_dropout", "dropout_checkpoints", "dropout_masks"]
