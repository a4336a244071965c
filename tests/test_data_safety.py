"""`n2n data` tried as a careless user would (issue 34): OUT inside IN, file names that are
not UTF-8, bad shots and their partners, exit statuses, and the pickle refusal's wording."""
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.datasets import open_dataset, open_pairs

NOT_UTF8 = os.fsdecode(b"bad\xff\xfeutf8.png")  # a name as a Linux file system may hold it


def data(*args):
    result = CliRunner().invoke(main, ["data", *map(str, args), "--no-progress"])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def images(folder, names, size=(12, 12), seed=0, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        shape = size + ((3,) if mode == "RGB" else ())
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name, format="PNG")
    return folder


def test_pack_and_pairs_refuse_an_out_inside_their_input(tmp_path):
    """Row 6: OUT inside IN used to be accepted; the folder was then read as Parquet and
    the images that came after were ignored."""
    good = images(tmp_path / "good", ["s/a.png", "s/b.png"])
    before = sorted(p.name for p in good.rglob("*"))
    for command, out in (("pairs", good / "p.parquet"), ("pack", good / "p.parquet"),
                         ("pack", good / "s" / "x.parquet"), ("pack", good), ("pairs", good)):
        status, output = data(command, good, out)
        assert status == 2, (command, out, output)
        lines = output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert sorted(p.name for p in good.rglob("*")) == before
    assert open_dataset(good).kind == "folder" and len(open_dataset(good)) == 2


def test_unpack_refuses_a_folder_that_overlaps_its_table(tmp_path):
    src = images(tmp_path / "src", ["a.png"])
    assert data("pack", src, tmp_path / "t.parquet")[0] == 0
    table = tmp_path / "t.parquet"
    status, output = data("unpack", table, tmp_path / "t.parquet" / "x")
    assert status == 2 and "Error:" in output


def test_import_pkl_never_replaces_a_file_unless_asked(tmp_path):
    pair = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.save((pair, pair), tmp_path / "c.pkl")
    (tmp_path / "mine.parquet").write_bytes(b"the user's notes")
    status, output = data("import-pkl", tmp_path / "c.pkl", tmp_path / "mine.parquet")
    assert status == 2 and "exists; --overwrite replaces it" in output
    assert (tmp_path / "mine.parquet").read_bytes() == b"the user's notes"
    assert data("import-pkl", tmp_path / "c.pkl", tmp_path / "mine.parquet", "--overwrite")[0] == 0
    assert len(open_pairs(tmp_path / "mine.parquet")) == 2


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_refused_pickle_does_not_repeat_torchs_advice(tmp_path):
    """Row 14: the refusal used to end with torch's advice to rerun with weights_only=False."""
    torch.save((_Payload(), torch.zeros(1)), tmp_path / "evil.pkl")
    status, output = data("import-pkl", tmp_path / "evil.pkl", tmp_path / "out.parquet")
    assert status == 1 and not (tmp_path / "out.parquet").exists()
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "evil.pkl" in lines[0], output
    assert "weights_only=False" not in output and "trust" not in output.lower()
    assert "refused" in lines[0] and "system" in lines[0]  # what it asked to run, named


def test_pack_fails_a_file_name_that_is_not_utf8_by_name_and_packs_the_rest(tmp_path):
    """Row 3 (pack): a file named b'bad\\xff\\xfeutf8.png' aborted the whole pack."""
    src = images(tmp_path / "src", ["a.png", "c.png"])
    images(src, [NOT_UTF8])
    status, output = data("pack", src, tmp_path / "t.parquet")
    assert status == 1, output
    assert "bad: bad\\xff\\xfeutf8.png: " in output and "UTF-8" in output
    assert "packed 2 images" in output
    assert open_dataset(tmp_path / "t.parquet").keys == ["a.png", "c.png"]
    status, output = data("info", src)
    assert status == 0 and "3 good images" in output


def test_noisy_copies_exit_1_when_an_image_is_left_out_and_name_it_once(tmp_path):
    """Row 11: `data noisy` exited 0, and its bad line said the name twice."""
    clean = images(tmp_path / "clean", ["a.png"])
    (clean / "broken.png").write_bytes(b"not an image")
    status, output = data("noisy", clean, tmp_path / "noisy")
    assert status == 1, output
    bad = [line for line in output.splitlines() if line.startswith("bad:")]
    assert len(bad) == 1 and bad[0].count("broken.png") == 1, output
    assert (tmp_path / "noisy" / "a.png").is_file()


def test_pairs_exit_1_and_name_every_shot_left_out_with_the_partner_of_a_bad_one(tmp_path):
    """Row 11: `data pairs` exited 0 while leaving shots out, dropped the partner of a bad
    shot without naming it, and called a grey+RGB pair 'shots differ in size'."""
    bursts = images(tmp_path / "bursts", ["ok/1.png", "ok/2.png", "bad/2.png"])
    (bursts / "bad" / "1.png").write_bytes(b"garbage")
    images(bursts / "mixed", ["1.png"])
    images(bursts / "mixed", ["2.png"], mode="L")
    status, output = data("pairs", bursts, tmp_path / "p.parquet")
    assert status == 1, output
    assert "wrote 1 pairs" in output
    lines = [line for line in output.splitlines() if line.startswith("bad:")]
    assert any("bad/1.png" in line for line in lines), output
    partner = [line for line in lines if "bad/2.png" in line]
    assert partner and "bad/1.png" in partner[0], output  # the partner is named, with why
    mixed = [line for line in lines if "mixed" in line]
    assert mixed and "differ in size" not in mixed[0] and "grey" in mixed[0] and "RGB" in mixed[0], output
    assert open_pairs(tmp_path / "p.parquet").keys == ["ok/1.png"]


def test_pack_exits_1_when_files_are_left_out(tmp_path):
    src = images(tmp_path / "src", ["a.png"])
    (src / "broken.png").write_bytes(b"")
    status, output = data("pack", src, tmp_path / "t.parquet")
    assert status == 1 and "bad: broken.png: empty file" in output and "packed 1 images" in output
