"""Which inputs a denoising run processes, and which it settles before any actor starts.

`plan_inputs` gives every input exactly one of:
- failed, decided here: a null key; a key that appears on several rows (which row is
  meant is unknown, so none is processed); for folder output, a key that escapes OUT or
  names the job's own files, a key that aliases another after normalisation
  (`x/y.png`, `x/./y.png`, `x//y.png`: none of them is written), and a key whose output
  name is taken by a file n2n did not write (it is never replaced, `--overwrite` or not);
- skipped: finished by an earlier run from the same input (size and modification time,
  or the Parquet table's fingerprint) with the same settings, and its output is still
  there, as written; one whose input or settings changed is redone (`stale`);
- to do.
"""
from __future__ import annotations

import collections
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.inference.manifest import FAILED, FINISHED, SKIPPED, Entry, ManifestState, made_from_same, \
    output_matches, record_file, written_by_us
from pipeline.inference.outputs import PathEscapeError, safe_relative_path


@dataclass
class Plan:
    early: list = field(default_factory=list)  # Entries settled without an actor
    todo: list = field(default_factory=list)  # (index, key) to process
    settled: set = field(default_factory=set)  # keys not to process (Parquet input: rows the actors drop)
    stale: int = 0  # finished by an earlier run, but from another input or with other settings: redone
    replace_parts: bool = False  # Parquet output: n2n's parts are removed first (stale rows share them)


def _in_the_way(root: Path, target: str, record: dict | None, state: ManifestState) -> str:
    """Why the entry at OUT/target must not be replaced ("" when nothing is there, or it is
    a file n2n wrote). `root`: OUT's local folder, or a `remote.RemoteTree`."""
    if hasattr(root, "file_info"):  # an object store: no links; a "folder" is a prefix in use
        if root.is_folder(target):
            return "is a folder in OUT"
        if root.file_info(target) is None:
            return ""
        legacy = bool(record) and record.get("output") == target and record_file(record) is None
        return "" if written_by_us(root, target, state, legacy_ok=legacy) else \
            "exists in OUT and was not written by n2n; it is not replaced"
    try:
        info = os.lstat(root / target)
    except FileNotFoundError:
        return ""
    except OSError as e:  # a file where a folder of the path should be, a name too long...
        return f"cannot be written: {e.strerror or e}"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder in OUT"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link in OUT (n2n never writes through one)"
    legacy = bool(record) and record.get("output") == target and record_file(record) is None
    if not written_by_us(root, target, state, legacy_ok=legacy):
        return "exists in OUT and was not written by n2n; it is not replaced"
    return ""


def plan_inputs(keys: list[str], *, null_rows, problems, output_kind: str, state: ManifestState, root: Path,
                overwrite: bool, row_name, source_of=None, settings: dict | None = None) -> Plan:
    """`keys` in input order; `null_rows` the indices of null keys; `problems` (name, reason)
    of inputs that could not even be listed; `row_name(i)` names row i for messages.
    `source_of(i)`: what input i is made of now (its "source"), `settings`: this run's; a
    finished output is skipped only when its line records the same (`made_from_same`)."""
    plan = Plan()
    for name, reason in problems:
        plan.early.append(Entry(name, FAILED, reason))
    rows_of = collections.defaultdict(list)
    for index, key in enumerate(keys):
        if index in null_rows:
            plan.early.append(Entry(row_name(index), FAILED, "null key: the row has no name to write it under"))
        else:
            rows_of[key].append(index)
    targets = {}  # folder output: key -> normalized relative path
    for key, rows in rows_of.items():
        if len(rows) > 1:
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            reason = f"key {key!r} appears on {len(rows)} rows ({shown}); none processed"
            plan.early += [Entry(key, FAILED, reason) for _ in rows]  # one outcome per row
            plan.settled.add(key)
        elif output_kind == "folder":
            try:
                targets[key] = safe_relative_path(key)
            except PathEscapeError as error:
                plan.early.append(Entry(key, FAILED, str(error)))
                plan.settled.add(key)
    keys_of_target = collections.defaultdict(list)
    for key, target in targets.items():
        keys_of_target[target].append(key)
    for target, aliases in keys_of_target.items():
        if len(aliases) > 1:
            for key in aliases:
                others = ", ".join(repr(k) for k in aliases if k != key)
                plan.early.append(Entry(key, FAILED, f"refused {key!r}: the same output {target!r} as {others} "
                                                     f"after normalisation; none of them is written"))
                plan.settled.add(key)
    for key, rows in rows_of.items():
        if key in plan.settled:
            continue
        record = state.latest.get(key)
        if not overwrite and record and record["status"] in FINISHED and output_matches(root, record):
            source = source_of(rows[0]) if source_of is not None else record.get("source")
            if made_from_same(record, source, settings if source_of is not None else record.get("settings")):
                plan.early.append(Entry(key, SKIPPED, "done by an earlier run", record["output"],
                                        file=record_file(record), source=record.get("source")))
                plan.settled.add(key)
                continue
            plan.stale += 1  # its output is n2n's: replaced below like any output n2n wrote
        target = targets.get(key)
        in_the_way = _in_the_way(root, target, record, state) if target is not None else ""
        if in_the_way:
            plan.early.append(Entry(key, FAILED, f"refused {key!r}: {target} {in_the_way}"))
            plan.settled.add(key)
            continue
        plan.todo.append((rows[0], key))
    plan.todo.sort()
    return plan
