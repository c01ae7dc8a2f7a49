"""tdabench.benchmark."""
