"""Bulk denoising: tiled inference of one image, and the Ray job over folders and Parquet."""
from pipeline.inference.config import DenoiseConfig, DenoiseSummary
from pipeline.inference.job import run_denoise
from pipeline.inference.job_output import read_manifest
from pipeline.inference.tiling import denoise_image

__all__ = ["DenoiseConfig", "DenoiseSummary", "denoise_image", "read_manifest", "run_denoise"]
