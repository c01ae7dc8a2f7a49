import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if (
            item.get_closest_marker("gpu") is not None
        ):  # not "gpu" in keywords: a folder named gpu matches
            item.add_marker(skip)
