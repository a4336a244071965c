"""n2n_core must be built from torch tensor operations alone.

Scans every source file of the package and fails on any use of torch.nn (its functional
part included: the convolutions build their own windows, no `unfold` / `fold`), of autograd,
`.backward()` on a tensor, `requires_grad`, `torch.optim`, or an import of Ray or `pipeline`.
"""
import ast
import pathlib

import n2n_core

PACKAGE = pathlib.Path(n2n_core.__file__).parent


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _violations(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if name.startswith(("torch.nn", "torch.autograd", "torch.optim", "ray", "pipeline")):
                    found.append(f"{where} import {name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith(("torch.autograd", "torch.optim", "ray", "pipeline")):
                found.append(f"{where} from {module} import ...")
            elif module == "torch" and any(a.name in {"nn", "autograd", "optim"} for a in node.names):
                found.append(f"{where} from torch import {[a.name for a in node.names]}")
            elif module.startswith("torch.nn"):
                for alias in node.names:
                    found.append(f"{where} from {module} import {alias.name}")
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted and dotted.startswith(("torch.nn.", "torch.autograd", "torch.optim")):
                found.append(f"{where} uses {dotted}")
            if node.attr == "requires_grad" or node.attr == "requires_grad_":
                found.append(f"{where} uses .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "backward" and _dotted(node.func.value) not in {"self", "super"}:
                # module.backward(grad) is our own contract; tensor.backward() takes no
                # gradient argument from us and is what we forbid.
                if not node.args:
                    found.append(f"{where} calls .backward() with no gradient (autograd)")
        elif isinstance(node, ast.keyword) and node.arg == "requires_grad":
            found.append(f"{where} passes requires_grad=")
        elif isinstance(node, ast.Name) and node.id in {"autograd", "no_grad", "enable_grad"}:
            found.append(f"{where} uses {node.id}")
    return found


def test_package_has_sources():
    assert len(list(PACKAGE.rglob("*.py"))) >= 1


def test_n2n_core_uses_only_tensor_operations():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        violations += _violations(path)
    assert not violations, "forbidden in n2n_core:\n" + "\n".join(violations)


def test_scanner_catches_forbidden_code(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nimport torch.nn as nn\nfrom torch import autograd\n"
        "x = torch.zeros(1, requires_grad=True)\ny = torch.nn.Conv2d(1, 1, 1)\n"
        "x.sum().backward()\nimport ray\nfrom torch.nn.functional import unfold\n"
        "z = torch.nn.functional.fold\n"
    )
    found = _violations(bad)
    text = "\n".join(found)
    for expected in ["import torch.nn", "torch import ['autograd']", "requires_grad=", "torch.nn.Conv2d",
                     ".backward() with no gradient", "import ray", "from torch.nn.functional import unfold",
                     "uses torch.nn.functional.fold"]:
        assert expected in text, f"scanner missed {expected!r}; found:\n{text}"
