"""`n2n export` as a careless or hostile user meets it: OUT is never replaced or written through,
every refusal is one line with exit status 2 and leaves nothing behind, and an export is
complete or absent."""
import os
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import UsageError
from pipeline.export import destination
from tests.export_helpers import train_checkpoint


def _run(*args):
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    return result.exit_code, result.output


def _leftovers(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.n2n"
    train_checkpoint(path, "seed-deep-grey", steps=3)
    return path


def test_writes_a_torch_export_and_says_what_it_is(checkpoint, tmp_path):
    code, output = _run(checkpoint, tmp_path / "new" / "denoiser", "--format", "torch")
    assert code == 0, output
    size = sum(p.stat().st_size for p in (tmp_path / "new" / "denoiser").iterdir())
    assert output == (f"wrote {tmp_path / 'new' / 'denoiser'} (torch.nn module + safetensors weights, "
                      f"{size / 1e3:.0f} kB): "
                      f"input (batch, 1, height, width) float32 in [0, 1], height and width multiples of 16 "
                      f"(docs/export.md)\n")
    assert sorted(os.listdir(tmp_path / "new" / "denoiser")) == ["n2n_model.py", "n2n_model.safetensors"]
    assert _leftovers(tmp_path / "new") == []


@pytest.mark.parametrize("kind", ["file", "empty folder", "folder", "symlink", "dangling symlink"])
@pytest.mark.parametrize("fmt, name", [("torch", "out"), ("onnx", "out.onnx"), ("bioimageio", "out.zip")])
def test_never_replaces_what_is_at_out(checkpoint, tmp_path, kind, fmt, name):
    out, target = tmp_path / name, tmp_path / "elsewhere"
    target.mkdir()
    if kind == "file":
        out.write_text("mine")
    elif kind in ("empty folder", "folder"):
        out.mkdir()
        if kind == "folder":
            (out / "photo.png").write_text("mine")
    elif kind == "symlink":
        out.symlink_to(target, target_is_directory=True)
    else:
        out.symlink_to(tmp_path / "missing")
    before = sorted(os.listdir(tmp_path))
    code, output = _run(checkpoint, out, "--format", fmt)
    assert code == 2 and output == f"Error: OUT {str(out)!r} exists; n2n export never replaces anything: choose a " \
                                   f"new name\n"
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(target) == []
    if kind == "file":
        assert out.read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["{ckpt}", "s3://bucket/out.onnx"], "Error: OUT 's3://bucket/out.onnx': n2n export writes local files; export "
                                         "here, then copy the result\n"),
    (["{ckpt}", "{tmp}/out"], "Error: --format is needed for OUT '{tmp}/out': onnx (OUT ending in .onnx), torch (a "
                              "new folder) or bioimageio (OUT ending in .zip)\n"),
    (["{ckpt}", "{tmp}/out.zip", "--format", "onnx"], "Error: --format onnx: OUT must end in .onnx, got "
                                                      "'{tmp}/out.zip'\n"),
    (["{ckpt}", "{tmp}/out.onnx", "--format", "torch"], "Error: --format torch: OUT names the new folder that will "
                                                        "hold n2n_model.py and n2n_model.safetensors, got "
                                                        "'{tmp}/out.onnx'\n"),
    (["{tmp}/missing.n2n", "{tmp}/out.onnx"], "Error: MODEL {tmp}/missing.n2n: cannot read file (No such file or "
                                              "directory)\n"),
    (["{tmp}/notes.txt", "{tmp}/out.onnx"], "Error: MODEL {tmp}/notes.txt: "),
    (["{tmp}", "{tmp}/out.onnx"], "Error: MODEL {tmp}: "),
    (["{ckpt}", "{tmp}/notes.txt/out.onnx"], "Error: OUT '{tmp}/notes.txt/out.onnx': a folder on the way is not a "
                                             "folder ({tmp}/notes.txt)\n"),
])
def test_refusals_are_one_line_and_write_nothing(checkpoint, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("not a checkpoint, long enough to have a header length" * 3)
    fill = {"ckpt": checkpoint, "tmp": tmp_path}
    before = sorted(os.listdir(tmp_path))
    code, output = _run(*[a.format(**fill) for a in args])
    expected = message.format(**fill)
    assert code == 2, output
    assert output.startswith(expected) and output.count("\n") == 1, output
    assert sorted(os.listdir(tmp_path)) == before


def test_missing_exporter_package_is_named_and_nothing_is_written(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    code, output = _run(checkpoint, tmp_path / "out.onnx")
    assert code == 2
    assert output == "Error: the ONNX export needs the onnxscript package: pip install 'n2n[export]' (onnx and " \
                     "onnxscript)\n"
    assert os.listdir(tmp_path) == []


def test_a_failure_while_building_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    from pipeline.export import torch_format

    def broken(model, folder, label):
        (folder / "n2n_model.py").write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_format, "write_torch_files", broken)
    code, output = _run(checkpoint, tmp_path / "out", "--format", "torch")
    assert code == 1 and "No space left on device" in output and output.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_a_name_taken_while_exporting_is_not_replaced(tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    (built / "n2n_model.py").write_text("new")
    taken = tmp_path / "taken"
    taken.mkdir()  # empty: a plain rename(2) would replace it
    with pytest.raises(UsageError, match="was made while exporting; not replaced"):
        destination.place_folder(built, taken)
    assert os.listdir(taken) == [] and os.listdir(built) == ["n2n_model.py"]
    (tmp_path / "file").write_text("new")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="was made while exporting; not replaced"):
        destination.place_file(tmp_path / "file", tmp_path / "link")
    assert os.readlink(tmp_path / "link") == str(tmp_path / "nowhere") and not (tmp_path / "nowhere").exists()


def test_model_as_a_file_uri_and_help(checkpoint, tmp_path):
    code, output = _run(f"file://{checkpoint}", tmp_path / "m", "--format", "torch")
    assert code == 0, output
    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0 and "--format [onnx|torch|bioimageio]" in result.output
