"""Runs twinkle-kit 0.5.1's own classes as the reference for the native-API parity tests.

twinkle-kit is not in the project's venv (it pins other transformers/peft versions and weighs
1.7 GB); it lives in its own venv, `.venv-twinkle-ref` (`make install-twinkle-ref`), or wherever
env TWINKLE_REF_PYTHON points. Each test module sends its cases to one subprocess of that python
(tests/support/twinkle_ref_worker.py), exchanging tensors as safetensors files in a temp folder.
Without the venv the parity tests skip with SKIP_REASON.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("twinkle_ref_worker.py")
DEFAULT_PYTHON = ROOT / ".venv-twinkle-ref" / "bin" / "python"
SKIP_REASON = "twinkle-kit reference venv missing (make install-twinkle-ref)"
TWINKLE_KIT_VERSION = "0.5.1"


def ref_python() -> Path | None:
    path = Path(os.environ.get("TWINKLE_REF_PYTHON") or DEFAULT_PYTHON)
    return path if path.is_file() else None


def require_ref_python() -> Path:
    path = ref_python()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@dataclass
class Reference:
    """What the reference answered: per job, its JSON and its tensors."""

    json: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def tensor(self, job: str, key: str) -> torch.Tensor:
        return self.tensors[f"{job}:{key}"]


def run_reference(
    specs: dict[str, Any], tensors: dict[str, torch.Tensor], workdir: Path, timeout: float = 240
) -> Reference:
    """Run the worker's jobs ({job name: spec}) in one process of the reference python."""
    python = require_ref_python()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(specs))
    save_file({k: v.contiguous() for k, v in tensors.items()} or {"_": torch.zeros(1)}, workdir / "in.safetensors")
    # One thread: the machine is shared and the cases are tiny.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # -P: the worker's folder (tests/support, which has an http.py) must not shadow the stdlib.
    proc = subprocess.run(
        [str(python), "-P", str(WORKER), str(workdir)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"reference jobs {list(specs)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads((workdir / "out.json").read_text())
    assert out.pop("twinkle_kit_version") == TWINKLE_KIT_VERSION
    return Reference(out, load_file(workdir / "out.safetensors"))
