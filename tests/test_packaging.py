"""What a build of the project ships: every package the code imports, the Python API's `n2n` among them."""
import configparser
import pathlib

from setuptools import find_packages

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_setup_cfg_ships_every_package():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    include = config["options.packages.find"]["include"].split()
    shipped = set(find_packages(str(ROOT), include=include))
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in ROOT.glob("*/**/__init__.py")
               if p.parts[len(ROOT.parts)] in ("n2n", "n2n_core", "pipeline")}
    assert {"n2n", "n2n_core", "pipeline", "pipeline.export"} <= shipped
    assert on_disk <= shipped, sorted(on_disk - shipped)
