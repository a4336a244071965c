"""The rooms of `pipeline/` are layered: a room imports only rooms of lower layers (or its own).

data sits below training and inference, both below the commands; storage and errors are
the floor (errors lowest). A new import that climbs up (say, data importing training) fails here, with
the file and line. The n2n_core rule (imports neither Ray nor pipeline) is
tests/test_source_rules.py's.
"""
import ast
import pathlib

import pipeline

PACKAGE = pathlib.Path(pipeline.__file__).parent

# room -> layer; a room may import rooms of a lower layer only (its own too)
LAYERS = {
    "errors": 0,
    "storage": 1, "assets": 1,
    "data": 2, "runtime": 2,
    "model_files": 3, "inference": 3,
    "quality": 4,
    "training": 5,
    "sweep": 6, "demo": 6,
    "export": 7,
    "commands": 8,
    "cli": 9,
}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def imports(path: pathlib.Path):
    """(line, imported module) of every `pipeline...` import in the file, lazy ones included."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_every_room_has_a_layer():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    rooms |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert rooms == set(LAYERS), f"rooms without a layer: {rooms - set(LAYERS)}; gone: {set(LAYERS) - rooms}"


def test_no_room_imports_a_room_above_it():
    climbs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        room = room_of(".".join(relative.parts))
        if room is None:
            continue  # pipeline/__init__.py
        for line, module in imports(path):
            target = room_of(module) if module.startswith("pipeline.") else None
            if target and target != room and LAYERS[target] >= LAYERS[room]:
                climbs.append(f"{relative}.py:{line} ({room}, layer {LAYERS[room]}) imports {module} "
                              f"({target}, layer {LAYERS[target]})")
    assert not climbs, "imports that climb a layer:\n" + "\n".join(climbs)


def test_the_rule_catches_a_climb(tmp_path):
    """The check itself can fail: data importing training is found."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from pipeline.training.driver import train\n")
    found = [(line, m) for line, m in imports(source) if room_of(m) == "training"]
    assert found == [(2, "pipeline.training.driver")]
    assert LAYERS[room_of(found[0][1])] >= LAYERS["data"]
