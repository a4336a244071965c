"""Checks made before a denoising job creates or deletes anything.

Each failure is a `UsageError` (exit status 2) with one line naming the argument:
- IN does not exist (and OUT is then not created);
- IN and OUT overlap: the same folder (also as `./IN/.` or through a symlink), OUT inside
  IN (a rerun would denoise its own outputs), or IN inside OUT (an output could replace
  an original); compared after resolving symlinks, for local paths;
- OUT is not empty and holds no n2n manifest (a Spark-style dataset, someone's photos):
  n2n writes only into an empty folder or one it wrote before, and `--overwrite` does not
  change that (it redoes n2n's own outputs only);
- OUT, or the folder it would be made in, is not writable, or OUT is a file;
- a Parquet input whose key or image column is missing or of the wrong type, or that
  already has the output column;
- OUT was last written from another IN (its manifest says which), unless `--overwrite`.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow as pa

from pipeline.errors import UsageError
from pipeline.inference.manifest import MANIFEST_NAME
from pipeline.inference.outputs import COMPARE_NAME, STAGING_NAME
from pipeline.storage.local_paths import overlap
from pipeline.storage.locations import is_uri, local_path


def check_input_exists(source: str) -> None:
    if not is_uri(source) and not os.path.exists(source):
        raise UsageError(f"IN {source!r}: no such file or folder")


def check_separate(source: str, output: str) -> None:
    """IN and OUT must not overlap (local paths and file:// URIs, symlinks resolved)."""
    local_source, local_output = local_path(source), local_path(output)
    if local_source is None and local_output is None:  # object stores hold no links: compare the places
        how = _uri_overlap(source, output)
    elif local_source is None or local_output is None:
        return  # one local, one on an object store: never the same place
    else:
        how = overlap(local_source, local_output)
    if how == "same":
        raise UsageError(f"OUT {output!r} is IN {source!r} (the same place once links and '.' are resolved): "
                         "the outputs would replace the originals; choose another OUT")
    if how == "b inside a":
        raise UsageError(f"OUT {output!r} is inside IN {source!r}: a rerun would denoise its own outputs; "
                         "choose an OUT outside IN")
    if how == "a inside b":
        raise UsageError(f"IN {source!r} is inside OUT {output!r}: an output could replace an original; "
                         "choose an OUT that does not contain IN")


def _uri_overlap(a: str, b: str) -> str | None:
    """How two object-store URIs overlap, as `local_paths.overlap`: compared as normalized
    places (scheme, bucket and key prefix; query, doubled and trailing slashes ignored)."""
    from pipeline.inference.remote import uri_location

    (scheme_a, path_a), (scheme_b, path_b) = uri_location(a), uri_location(b)
    if scheme_a != scheme_b:
        return None
    if path_a == path_b:
        return "same"
    if path_b.startswith(path_a + "/"):
        return "b inside a"
    if path_a.startswith(path_b + "/"):
        return "a inside b"
    return None


def check_remote_output(out) -> None:
    """The object-store version of `check_output` (`out`: a `remote.RemoteOut`): OUT is no
    object, and holds nothing or n2n's manifest. Writability shows at the first write."""
    import pyarrow.fs as pafs

    output = out.where()
    try:
        if out.info("").type == pafs.FileType.File:
            raise UsageError(f"OUT {output!r} exists and is an object, not a folder")
        entries = out.listing()
    except UsageError:
        raise
    except OSError as e:
        raise UsageError(f"OUT {output!r}: cannot be listed ({e})") from None
    names = {out.relative(i) for i in entries}
    if names and MANIFEST_NAME not in names:
        raise UsageError(
            f"OUT {output!r} is not empty and holds no n2n manifest ({MANIFEST_NAME}): n2n writes only into an "
            f"empty folder or one it wrote before, and deletes nothing it did not write; --overwrite is no way "
            f"around this (it redoes n2n's own outputs only). Choose a new OUT")
    if names and out.info(MANIFEST_NAME).type != pafs.FileType.File:
        raise UsageError(f"OUT {output!r}: {MANIFEST_NAME} is not an object")


def check_output(output: str) -> None:
    """OUT is absent (and can be made), empty, or a folder n2n wrote (it holds the manifest)."""
    root = Path(output)
    try:
        info = os.stat(root)  # OUT itself may be a link to a folder: the user named it
    except FileNotFoundError:
        _check_creatable(root, output)
        return
    except OSError as e:
        raise UsageError(f"OUT {output!r}: {e.strerror or e}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"OUT {output!r} exists and is not a folder")
    try:
        names = os.listdir(root)
    except OSError as e:
        raise UsageError(f"OUT {output!r}: cannot list it ({e.strerror or e})") from None
    if names and MANIFEST_NAME not in names:
        raise UsageError(
            f"OUT {output!r} is not empty and holds no n2n manifest ({MANIFEST_NAME}): n2n writes only into an "
            f"empty folder or one it wrote before, and deletes nothing it did not write; --overwrite is no way "
            f"around this (it redoes n2n's own outputs only). Choose a new OUT")
    if names and not stat.S_ISREG(os.lstat(root / MANIFEST_NAME).st_mode):
        raise UsageError(f"OUT {output!r}: {MANIFEST_NAME} is not a regular file")
    for name in (STAGING_NAME, COMPARE_NAME):  # n2n's own folders: a link there is not n2n's
        if name in names and not stat.S_ISDIR(os.lstat(root / name).st_mode):
            raise UsageError(f"OUT {output!r}: {name} is a symbolic link or a file, not the folder n2n makes; "
                             f"remove it")
    if not os.access(root, os.W_OK | os.X_OK):
        raise UsageError(f"OUT {output!r} is not writable")


def check_same_input(source: str, output: str, identity: str, last_in: str | None) -> None:
    """OUT was last written from another IN (its manifest's latest "in"): refuse, since an
    output of the same name would be skipped as done although it was made from another
    file (`--overwrite` redoes every input, replacing n2n's own outputs only)."""
    if last_in is not None and last_in != identity:
        raise UsageError(f"OUT {output!r} was written from IN {last_in!r}, not from {identity!r}: its outputs "
                         f"were made from other files; pass --overwrite to replace n2n's outputs there with "
                         f"this IN's, or choose another OUT")


def _check_creatable(root: Path, output: str) -> None:
    parent = root.absolute().parent
    while not parent.exists():
        if parent.is_symlink():
            raise UsageError(f"OUT {output!r}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"OUT {output!r}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"OUT {output!r} cannot be created: {parent} is not writable")


def make_output(output: str) -> Path:
    root = Path(output)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"OUT {output!r} cannot be created: {e.strerror or e}") from None
    return root


def _is_text_or_integer(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def check_parquet_schema(source: str, schema: pa.Schema, key_column: str, image_column: str,
                         output_column: str) -> None:
    """The Parquet input has a usable key column, a binary image column and no output column."""
    names = schema.names
    if key_column == image_column:
        raise UsageError(f"--key-column and --image-column are both {key_column!r}; they must differ")
    for option, column in (("--key-column", key_column), ("--image-column", image_column)):
        if column not in names:
            raise UsageError(f"IN {source!r}: no column {column!r} ({option}); columns: {names}")
    key_type, image_type = schema.field(key_column).type, schema.field(image_column).type
    if not _is_text_or_integer(key_type):
        raise UsageError(f"IN {source!r}: key column {key_column!r} has type {key_type}; keys must be strings or "
                         f"integers (--key-column)")
    if not _is_bytes(image_type):
        raise UsageError(f"IN {source!r}: image column {image_column!r} has type {image_type}; it must hold the "
                         f"encoded image files as binary (--image-column)")
    if output_column in names:
        raise UsageError(f"IN {source!r} already has a column {output_column!r}; choose another --output-column")
