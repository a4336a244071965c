"""Exporting n2n models for other tools: ONNX, plain torch, the BioImage Model Zoo (docs/export.md)."""
