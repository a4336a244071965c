"""Bulk denoising: tiled inference of one image, and the Ray job over folders and Parquet."""
from pipeline.inference.job import DenoiseConfig, DenoiseSummary, run_denoise
from pipeline.inference.tiling import denoise_image

__all__ = ["DenoiseConfig", "DenoiseSummary", "denoise_image", "run_denoise"]
