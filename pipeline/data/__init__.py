"""Data: image decoding (`images`), folder and Parquet datasets (`datasets`, over `sources`;
`writers` write them; `records`: keys and unreadable records), noise models
(`noise`, `camera_noise`), training batches (`patches`), and the importers that make
training tables (`pkl_import`: the course's pickled pairs; `bursts`: burst shots).
See docs/data.md."""
