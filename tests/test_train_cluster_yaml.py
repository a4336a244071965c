"""cluster.yaml passes Ray's own config preparation and schema check (offline); broken copies do not."""
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


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
    # the project is copied to every node and installed by the setup commands (head and workers)
    assert "." in config["file_mounts"].values()
    mount = next(k for k, v in config["file_mounts"].items() if v == ".")
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and mount.replace("~", "$HOME") in c for c in config[key]), key


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
