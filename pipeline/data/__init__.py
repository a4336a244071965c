"""Data: image decoding (`images`), folder and Parquet datasets (`datasets`), noise models
(`noise`, `camera_noise`), training batches (`patches`), and the importers that make
training tables (`pkl_import`: the course's pickled pairs; `bursts`: burst shots).
See docs/data.md."""
