"""What a denoising run reads before it starts: the model's bytes, the input dataset, and
what every manifest line records of them (the IN's identity, the settings that shape pixels)."""
from __future__ import annotations

import hashlib
import os

from pipeline.errors import UsageError
from pipeline.inference.config import DenoiseConfig
from pipeline.inference.preflight import check_parquet_schema
from pipeline.storage.locations import is_uri, local_path


def model_path_of(config: DenoiseConfig) -> str:
    """--model, or the built-in default model's path when it is left out."""
    if config.model:
        return str(config.model)
    from pipeline.assets import default_model_path

    return str(default_model_path())


def read_model(model_path: str) -> bytes:
    """The checkpoint's bytes, read once on the driver (a local path or a URI), after checking
    that they load; errors name --model. The actors get these bytes through Ray's object store,
    so no worker ever needs to see the path."""
    from n2n_core import CheckpointError, load_checkpoint
    from n2n_core.tensorfile import MAX_FILE_BYTES

    try:
        if not is_uri(model_path) or local_path(model_path) is not None:
            path = local_path(model_path)
            load_checkpoint(path, name=model_path)  # refuses FIFOs, folders and oversized files unread
            with open(path, "rb") as f:
                data = f.read()
        else:
            import pyarrow.fs as pafs

            from pipeline.storage.locations import resolve

            try:
                fs, path = resolve(model_path)
                info = fs.get_file_info(path)
            except (OSError, ValueError) as e:
                raise CheckpointError(model_path, f"cannot be reached: {e}") from None
            if info.type != pafs.FileType.File:
                raise CheckpointError(model_path, "no such file")
            if info.size is not None and info.size > MAX_FILE_BYTES:
                raise CheckpointError(model_path, f"{info.size} bytes is larger than the {MAX_FILE_BYTES} allowed")
            with fs.open_input_stream(path) as f:
                data = f.read()
        load_checkpoint(data, name=model_path)
    except CheckpointError as e:
        raise UsageError(f"--model {e}") from None
    except OSError as e:
        raise UsageError(f"--model {model_path!r}: {e.strerror or e}") from None
    return data


def open_input(config: DenoiseConfig):
    """IN as an ImageDataset (folder) or ParquetDataset, OUT never listed in it; a Parquet input
    that Ray Data could not read to the end, or whose columns do not fit, is refused here."""
    from pipeline.data.datasets import open_dataset

    output = local_path(config.output)
    exclude = () if output is None else (output,)  # never list OUT as input
    try:
        dataset = open_dataset(config.input, image_column=config.image_column, key_column=config.key_column,
                               follow_symlinks=config.follow_symlinks, exclude=exclude)
    except (OSError, ValueError) as e:
        raise UsageError(f"IN {config.input!r}: {e}") from None
    if dataset.kind == "parquet":
        if dataset.problems:  # Ray Data's reader would stop on them mid-run: refuse up front
            raise UsageError(f"IN {config.input!r}: unreadable Parquet input: "
                             + "; ".join(f"{n}: {r}" for n, r in dataset.problems))
        check_parquet_schema(config.input, dataset.schema, config.key_column, config.image_column,
                             config.output_column)
    return dataset


def input_identity(source: str) -> str:
    """The IN a manifest line records: its real path (links and `.` resolved), or for a URI its
    place (scheme, bucket and key prefix; no query). Two runs from one IN record the same."""
    local = local_path(source)
    if local is not None:
        return os.path.realpath(local)
    from pipeline.inference.remote import uri_location

    scheme, place = uri_location(source)
    return f"{scheme}://{place}"


def pixel_settings(config: DenoiseConfig, model_bytes: bytes) -> dict:
    """What changes an output's pixels: the model's bytes and the options that shape its output
    (device, batch size, workers and the rest change only how fast it comes). The precision is
    recorded when it is not float32, so the outputs of runs before the option stay finished."""
    settings = {"model": hashlib.sha256(model_bytes).hexdigest(), "tile": config.tile or None,
                "overlap": config.overlap, "self_ensemble": bool(config.self_ensemble),
                "strength": float(config.strength)}
    if config.precision != "float32":
        settings["precision"] = config.precision
    return settings
