"""Measuring and showing denoising: evaluation on clean images, assessment without them, classical
peers, comparison strips."""
