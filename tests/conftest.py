"""Test setup shared by every test: offline Hugging Face libraries, a throwaway HF_HOME, wandb offline.

These variables must be set before huggingface_hub is imported (it reads them at import), hence module level.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="impruver-hf-home-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "HF_HOME": _HF_HOME,
    "TOKENIZERS_PARALLELISM": "false",
})
os.environ.pop("WANDB_API_KEY", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository (real tokenizers and datasets); skips where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real data folder {SHARED_DATA} (see its README); absent in this checkout")
    return SHARED_DATA


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the `impruver` command in a subprocess."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env
