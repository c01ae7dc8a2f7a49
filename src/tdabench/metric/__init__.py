"""tdabench.metric."""
