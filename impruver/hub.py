"""Hub ids versus local paths, and failing fast (with a fix) when the Hub cannot be reached."""

from __future__ import annotations

import os
import re
from pathlib import Path

from impruver.errors import RunError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) is set."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def is_local(path: str) -> bool:
    """A path on disk (or a pkg:// resource), as opposed to a Hub id such as 'org/name'."""
    if path.startswith("pkg://") or Path(path).expanduser().exists():
        return True
    return not HUB_ID.match(path) or path.startswith((".", "/", "~"))


def hub_unreachable(path: str, what: str, key: str, cause: BaseException | None = None) -> RunError:
    """The error for a Hub id that cannot be fetched: says why and how to point at local files instead."""
    why = "the Hub is switched off here (HF_HUB_OFFLINE=1)" if offline() else "the Hub could not be reached"
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause and str(cause) else ""
    return RunError(
        f"{key}: '{path}' is a Hugging Face Hub {what} id and {why}{detail}. Download it on a machine with "
        f"network access (huggingface-cli download {path} --local-dir DIR) and set {key}=DIR."
    )


def require_reachable(path: str, what: str, key: str) -> None:
    """Raise at once, before any retry loop, for a Hub id while offline."""
    if not is_local(path) and offline():
        raise hub_unreachable(path, what, key)
