"""The benchmarks: n2n against its torch.nn peer, and the pipeline's throughput.

Run each from the repository root as `python -m bench.NAME ...`, or as `python -m bench NAME ...`
(the same, with n2n's one-line errors), or `n2n bench NAME ...` (which runs the latter); their
figures go into BENCHMARKS.md. Not part of the installed package.
"""
