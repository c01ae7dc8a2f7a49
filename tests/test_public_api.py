"""The public surface users rely on (dattri-compatible names). Importing must not pull in
optional pipeline dependencies."""

import importlib
import subprocess
import sys

import pytest

PUBLIC = {
    "tdabench.task": ["AttributionTask"],
    "tdabench.algorithm": [
        "BaseAttributor",
        "IFAttributorExplicit",
        "IFAttributorCG",
        "IFAttributorLiSSA",
        "IFAttributorArnoldi",
        "TracInAttributor",
        "GradDotAttributor",
        "GradCosAttributor",
        "RPSAttributor",
        "TRAKAttributor",
        "IFAttributorEKFAC",
        "IFAttributorKFAC",
        "IFAttributorDataInf",
        "LoGraAttributor",
        "FactGraSSAttributor",
        "DVEmbAttributor",
        "KNNShapleyAttributor",
        "arguments_for",
    ],
    # dattri's module paths for the second-wave classes
    "tdabench.algorithm.influence_function": [
        "IFAttributorExplicit",
        "IFAttributorCG",
        "IFAttributorLiSSA",
        "IFAttributorArnoldi",
        "IFAttributorEKFAC",
        "IFAttributorDataInf",
    ],
    "tdabench.algorithm.logra": ["LoGraAttributor"],
    "tdabench.algorithm.dvemb": ["DVEmbAttributor"],
    "tdabench.algorithm.data_shapley": ["KNNShapleyAttributor"],
    "tdabench.func.curvature": ["ExactHessian", "GaussNewton", "EmpiricalFisher", "OutputLoss"],
    "tdabench.func.kfac": ["KFACOperator"],
    "tdabench.func.utils": ["flatten_func", "flatten_params", "partial_param"],
    "tdabench.model_util.hook": ["get_final_layer_io"],
    "tdabench.benchmark.utils": ["flip_label", "SubsetSampler"],
    "tdabench.benchmark.load": ["load_benchmark"],
    "tdabench.memory": ["planner_for", "MemoryPlanner"],
    "tdabench.func.hessian": [
        "hvp",
        "hvp_at_x",
        "ihvp_explicit",
        "ihvp_at_x_explicit",
        "ihvp_cg",
        "ihvp_at_x_cg",
        "ihvp_lissa",
        "ihvp_at_x_lissa",
        "ihvp_arnoldi",
        "ihvp_at_x_arnoldi",
    ],
    "tdabench.func.fisher": ["ifvp_explicit", "ifvp_at_x_explicit"],
    "tdabench.func.projection": ["make_projector", "ArnoldiProjector", "random_project"],
    "tdabench.model_util.dropout": ["activate_dropout", "dropout_checkpoints"],
    "tdabench.model_util.retrain": ["retrain_loo", "retrain_lds"],
    "tdabench.metric": [
        "lds",
        "loo_corr",
        "mislabel_detection_auc",
        "calculate_lds_ground_truth",
        "calculate_loo_ground_truth",
        "brittleness",
    ],
    "tdabench.benchmark": ["get_setting", "list_settings", "flip_labels"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names(module):
    mod = importlib.import_module(module)
    for name in PUBLIC[module]:
        assert hasattr(mod, name), f"{module}.{name} is missing"
    if hasattr(mod, "__all__"):
        for name in mod.__all__:
            assert hasattr(mod, name), f"{module}.__all__ lists missing {name}"


def test_import_has_no_side_effects():
    code = (
        "import sys, logging; import tdabench, tdabench.algorithm, tdabench.metric, tdabench.func.hessian;"
        "bad=[m for m in ('submitit','dvc','snakemake') if m in sys.modules];"
        "assert not bad, bad; assert not logging.getLogger().handlers"
    )
    import os
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
