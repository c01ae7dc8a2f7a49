"""tdabench.groundtruth."""
