"""Click commands of the `n2n` command line, one module per job; `jobs/*.py` call the same."""
