#!/usr/bin/env bash
# Install n2n on a cluster node: cluster.yaml's setup command, run by `ray up` on every node
# after the project has been copied to ~/n2n.
#
#   bash ~/n2n/cluster/setup-node.sh [EXTRAS]      # e.g. "cluster" on the head (boto3 for the autoscaler)
#
# - A virtual environment ~/n2n-venv from the node's python3 (made once), with the project
#   installed editable: a later `ray up` that copies changed code needs no reinstall.
# - pip runs only when setup.cfg / pyproject.toml / EXTRAS changed since the last install
#   (their hash is kept in the venv), so a repeated `ray up` costs seconds.
# - ~/.bashrc activates the venv: Ray's launcher runs every later command (`ray start`, the
#   `python` of `ray submit` and `ray exec`) through `bash -i`, which reads it.
set -euo pipefail

PROJECT="$HOME/n2n"
VENV="$HOME/n2n-venv"
EXTRAS="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi

activate='[ -f "$HOME/n2n-venv/bin/activate" ] && . "$HOME/n2n-venv/bin/activate"'
touch "$HOME/.bashrc"
grep -qxF "$activate" "$HOME/.bashrc" || echo "$activate" >> "$HOME/.bashrc"

stamp="$(cat "$PROJECT/setup.cfg" "$PROJECT/pyproject.toml" | sha256sum | cut -d' ' -f1) extras=[$EXTRAS]"
if [ "$(cat "$VENV/n2n-installed" 2>/dev/null || true)" = "$stamp" ]; then
    echo "n2n setup: requirements unchanged since the last install, pip skipped"
else
    target="$PROJECT"
    [ -n "$EXTRAS" ] && target="$PROJECT[$EXTRAS]"
    "$VENV/bin/python" -m pip install --quiet --editable "$target"
    echo "$stamp" > "$VENV/n2n-installed"
fi
"$VENV/bin/python" -c "import ray, torch, n2n_core, pipeline.training; print(f'n2n setup: ready (ray {ray.__version__}, torch {torch.__version__})')"
