"""Attributors. Every one: ``cache(train)``, ``attribute(train, test) -> (n_train, n_test)``,
``self_attribute(train) -> (n_train,)``.

Score convention: a high score means the training sample helps the test sample (removing it
would raise the test loss)."""

from tdabench.algorithm.arguments import arguments_for, register_arguments
from tdabench.algorithm.base import BaseAttributor
from tdabench.algorithm.data_shapley import KNNShapleyAttributor
from tdabench.algorithm.datainf import IFAttributorDataInf
from tdabench.algorithm.dvemb import DVEmbAttributor
from tdabench.algorithm.ekfac import IFAttributorEKFAC, IFAttributorKFAC
from tdabench.algorithm.factgrass import FactGraSSAttributor
from tdabench.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from tdabench.algorithm.logra import LoGraAttributor
from tdabench.algorithm.rps import RPSAttributor
from tdabench.algorithm.tracin import GradCosAttributor, GradDotAttributor, TracInAttributor
from tdabench.algorithm.trak import TRAKAttributor

__all__ = [
    "BaseAttributor",
    "DVEmbAttributor",
    "FactGraSSAttributor",
    "GradCosAttributor",
    "GradDotAttributor",
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorDataInf",
    "IFAttributorEKFAC",
    "IFAttributorExplicit",
    "IFAttributorKFAC",
    "IFAttributorLiSSA",
    "KNNShapleyAttributor",
    "LoGraAttributor",
    "RPSAttributor",
    "TRAKAttributor",
    "TracInAttributor",
    "arguments_for",
    "register_arguments",
]
