"""Running a config's items: the Lightning loop over batches (alignment), the run directory (store), what makes two
runs the same (identity), the weights check before a run (preflight), its end (summary) and its W&B logging
(tracking)."""
