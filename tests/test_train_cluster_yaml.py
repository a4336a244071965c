"""cluster.yaml passes Ray's own config preparation and schema check (offline); broken copies do not.

Also what it must hold beyond the schema: pinned images, S3 access and a CUDA check on the
workers, the tested Ray, and a node setup that is quick on a repeated `ray up`.
"""
import configparser
import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid():
    config = check(load())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0, "the head is a CPU-only driver"
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 1 for t in gpu_types)
    assert all(t["min_workers"] >= 1 for t in gpu_types)
    # what the nodes need of the project is copied to ~/n2n and installed by the setup script
    mounts = config["file_mounts"]
    assert all(remote == "~/n2n/" + local.removeprefix("./") for remote, local in mounts.items()), mounts
    needed = {"setup.cfg", "pyproject.toml", "README.md", "n2n_core", "pipeline", "jobs", "cluster"}
    assert {local.removeprefix("./") for local in mounts.values()} == needed
    assert all((ROOT / local).exists() for local in mounts.values())
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(c.startswith("bash ~/n2n/cluster/setup-node.sh") for c in config[key]), key


def test_images_are_pinned_and_the_same_everywhere():
    """A pinned AMI id, not Ray's `latest_dlami` (Ubuntu 18.04, where torch 2.13 does not install)."""
    images = {name: t["node_config"]["ImageId"] for name, t in load()["available_node_types"].items()}
    assert all(re.fullmatch(r"ami-[0-9a-f]{8,17}", image) for image in images.values()), images
    assert len(set(images.values())) == 1, f"one image, one Python version on every node: {images}"
    assert "Ubuntu 22.04" in CLUSTER_YAML.read_text()


def test_workers_get_s3_access_and_check_cuda():
    config = check(load())
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:
            assert node_type["node_config"]["IamInstanceProfile"]["Name"], name
    # the CUDA check runs after the install, on the workers only
    worker = config["worker_setup_commands"]
    assert "python -m pipeline.runtime.cuda" in worker
    assert worker.index("python -m pipeline.runtime.cuda") > next(i for i, c in enumerate(worker) if "setup-node.sh" in c)
    assert "python -m pipeline.runtime.cuda" not in config["head_setup_commands"]


def test_ray_is_pinned_to_the_tested_version():
    """The nodes install the project, so setup.cfg's pin is the cluster's Ray; it is the Ray tested here."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requires = [r.strip() for r in setup["options"]["install_requires"].split("\n") if r.strip()]
    ray_pins = [r for r in requires if r.startswith("ray")]
    assert ray_pins == [f"ray[default,data,tune]=={ray.__version__}"], ray_pins
    assert "boto3" in setup["options.extras_require"]["cluster"]  # the head's autoscaler talks to EC2


def test_node_setup_script_runs_pip_only_when_requirements_change(tmp_path):
    """cluster/setup-node.sh on a node whose venv's python only logs its calls (the real install:
    tests/test_cluster_launch.py): pip runs on the first setup and after setup.cfg or the extras
    change, never on a plain repeat; ~/.bashrc gets its activation line once."""
    home = tmp_path / "home"
    (home / "n2n").mkdir(parents=True)
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, home / "n2n" / name)
    log = tmp_path / "python-calls"
    fake = home / "n2n-venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n[ "$1" = -c ] && echo "n2n setup: ready (fake)"\nexit 0\n')
    fake.chmod(0o755)

    def setup(*extras) -> list[str]:
        log.write_text("")
        proc = subprocess.run(["bash", str(ROOT / "cluster" / "setup-node.sh"), *extras], env=dict(os.environ, HOME=str(home)),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [c for c in log.read_text().splitlines() if c.startswith("-m pip")]

    assert setup() == [f"-m pip install --quiet --editable {home}/n2n"]
    assert setup() == []
    assert setup("cluster") == [f"-m pip install --quiet --editable {home}/n2n[cluster]"]
    assert setup("cluster") == []
    with open(home / "n2n" / "setup.cfg", "a") as f:
        f.write("\n# a new requirement\n")
    assert len(setup("cluster")) == 1
    assert setup("cluster") == []
    bashrc = (home / ".bashrc").read_text().splitlines()
    assert bashrc == ['[ -f "$HOME/n2n-venv/bin/activate" ] && . "$HOME/n2n-venv/bin/activate"'], bashrc


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.update(max_wrkers=4), jsonschema.ValidationError),                       # unknown key
    (lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": "one"}),
     jsonschema.ValidationError),                                                         # non-integer resource
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="cpu_head"), ValueError),                          # no such node type
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9), ValueError),  # > max_workers
    (lambda c: c.update(setup_commands="pip install -e ."), (TypeError, jsonschema.ValidationError)),  # not a list
    (lambda c: c["provider"].pop("type"), (KeyError, jsonschema.ValidationError)),
], ids=["unknown-key", "string-gpu-count", "no-node-config", "missing-head-type", "min-over-max",
        "setup-not-a-list", "no-provider-type"])
def test_broken_copies_are_rejected(breakage, error):
    config = load()
    check(config)  # the unbroken copy passes
    breakage(config)
    with pytest.raises(error):
        check(config)
