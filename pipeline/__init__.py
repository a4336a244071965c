"""pipeline: everything around the n2n_core model: image and Parquet I/O, noise models,
Ray data-parallel training, bulk denoising, evaluation, and the `n2n` command line."""
