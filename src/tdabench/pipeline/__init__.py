"""tdabench.pipeline."""
