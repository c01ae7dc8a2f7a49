"""tdabench.model_util."""
