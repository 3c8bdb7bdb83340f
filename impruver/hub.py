"""Hub ids versus local paths, and failing fast (with a fix) when the Hub cannot be reached.

Offline detection is one short probe: ``HF_HUB_OFFLINE`` (and friends) answer without a request; otherwise one
HEAD request to the Hub's endpoint (``HF_ENDPOINT``) with a short timeout and no retries. When it fails, every Hub
id of the plan that is not in the local cache is reported at once, and the process switches the Hugging Face
libraries offline, so that what is cached loads at once instead of after their ~30-70 s of retries.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from impruver.errors import RunError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A snapshot in the Hub cache: .../models--org--name/snapshots/<revision> (the folder hf download fills).
CACHE_SNAPSHOT = re.compile(r"(?:^|/)(?P<kind>models|datasets)--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
PROBE_TIMEOUT_S = 3.0  # one HEAD request to the endpoint; a reachable Hub answers in well under a second
DEFAULT_ENDPOINT = "https://huggingface.co"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

RepoType = Literal["model", "dataset"]


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) is set."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def is_local(path: str) -> bool:
    """A path on disk (or a pkg:// resource), as opposed to a Hub id such as 'org/name'."""
    if path.startswith("pkg://") or Path(path).expanduser().exists():
        return True
    from impruver.layout import OUTPUTS_ROOT

    # outputs/demo: a run folder of impruver's (not trained yet), which the Hub never holds
    return not HUB_ID.match(path) or path.startswith((".", "/", "~", f"{OUTPUTS_ROOT}/"))


def hub_id_of(path: str) -> str | None:
    """The Hub id ``path`` names: the id itself, or the repository of a Hub-cache snapshot folder; else None."""
    if not is_local(path):
        return path
    found = CACHE_SNAPSHOT.search(Path(path).expanduser().resolve().as_posix())
    return f"{found['org']}/{found['name']}" if found else None


def download_command(repo_id: str, repo_type: RepoType = "model", dest: str = "DIR") -> str:
    """The command that fetches a repository into ``dest`` (huggingface_hub's ``hf`` CLI)."""
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    return f"hf download {repo_id}{kind} --local-dir {dest}"


def hub_unreachable(path: str, what: str, key: str, cause: BaseException | None = None) -> RunError:
    """The error for a Hub id that cannot be fetched: says why and how to point at local files instead."""
    why = "the Hub is switched off here (HF_HUB_OFFLINE=1)" if offline() else "the Hub could not be reached"
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause and str(cause) else ""
    repo_type: RepoType = "dataset" if what == "dataset" else "model"
    return RunError(
        f"{key}: '{path}' is a Hugging Face Hub {what} id and {why}{detail}. Download it on a machine with "
        f"network access ({download_command(path, repo_type)}) and set {key}=DIR."
    )


def require_reachable(path: str, what: str, key: str) -> None:
    """Raise at once, before any retry loop, for a Hub id while offline that is not in the local cache."""
    repo_type: RepoType = "dataset" if what == "dataset" else "model"
    if not is_local(path) and offline() and not cached(path, repo_type):
        raise hub_unreachable(path, what, key)


# -- the plan's Hub ids, all at once ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRef:
    """One Hub id a plan names: the key that names it, the id, and what kind of repository it is."""

    key: str  # model.path, tokenizer.path, dataset.sources.NAME.path
    repo_id: str
    repo_type: RepoType


def cached(repo_id: str, repo_type: RepoType) -> bool:
    """The repository has a snapshot in the Hub cache (or, for a dataset, a prepared copy in datasets' cache)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if repo_type == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
        return (datasets_cache / repo_id.replace("/", "___")).is_dir()
    return False


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the Hub's endpoint, no retries: any HTTP answer (even an error status) means reachable."""
    if offline():
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # refused, unresolvable, timed out, a malformed HF_ENDPOINT
        return False
    return True


def go_offline() -> None:
    """Switch this process (and the workers it starts) to the Hub cache: no request, no retry loop.

    huggingface_hub and datasets read the variable at import; a library already imported is told directly.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, attribute):
            setattr(loaded, attribute, True)


def missing(refs: list[HubRef]) -> tuple[list[HubRef], str]:
    """The refs that cannot be had here, and why ('' when none): not cached, and the Hub off or unreachable.

    With the Hub unreachable but everything cached, the process goes offline so the cache is used at once.
    """
    uncached = [r for r in refs if not cached(r.repo_id, r.repo_type)]
    if not refs:
        return [], ""
    if offline():
        return uncached, "the Hub is switched off here (HF_HUB_OFFLINE=1)"
    if reachable():
        return [], ""
    go_offline()
    return uncached, f"the Hub ({endpoint()}) could not be reached"


def missing_error(refs: list[HubRef], why: str) -> RunError:
    """One error naming every missing id, each with the command that downloads it and the setting that uses it."""
    lines = [f"  {r.key}: {r.repo_id} -> {download_command(r.repo_id, r.repo_type, _dest(r))}, then "
             f"{r.key}={_dest(r)}" for r in refs]
    return RunError(f"{len(refs)} Hugging Face Hub id(s) of the plan are not on this machine and {why}. Download "
                    "them on a machine with network access (or impruver download REPO --dest DIR) and point the "
                    "plan at the folders:\n" + "\n".join(lines))


def _dest(ref: HubRef) -> str:
    return f"./hub/{ref.repo_id.split('/')[-1]}"


__all__ = ["HUB_ID", "HubRef", "cached", "download_command", "go_offline", "hub_id_of", "hub_unreachable",
           "is_local", "missing", "missing_error", "offline", "reachable", "require_reachable"]
