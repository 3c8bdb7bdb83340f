"""``impruver download REPO [--repo-type model|dataset] [--dest DIR] [--revision R]``: fetch a Hub repository.

    impruver download ai-forever/rugpt3small_based_on_gpt2 --dest models/rugpt3small
    impruver download IlyaGusev/ru_turbo_saiga --repo-type dataset

Through ``huggingface_hub.snapshot_download`` (into the Hub cache, or into ``--dest``); prints the local folder
and the override that makes a plan use it. A gated or missing repository, or a Hub that cannot be reached, is one
line saying what to do, exit status 2, without waiting for retries (one short probe first, see
:mod:`impruver.hub`). Not a plan stage: it needs no config.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from impruver.errors import RunError
from impruver.hub import HUB_ID, endpoint, offline, reachable

REPO_TYPES = ("model", "dataset")
ETAG_TIMEOUT_S = 10.0  # per-file metadata request, once the Hub has answered the probe


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="impruver download", exit_on_error=False,
                                description="Fetch a Hugging Face Hub repository (a model or a dataset) and print "
                                            "the override that points a plan at it.")
    p.add_argument("repo", help="Hub repository id, e.g. ai-forever/rugpt3small_based_on_gpt2")
    p.add_argument("--repo-type", choices=REPO_TYPES, default="model")
    p.add_argument("--dest", help="folder to write the files to (default: the Hugging Face cache)")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    return p


def main(argv: list[str]) -> int:
    """The command: parse, download, print the folder and the override; RunError (exit 2) on failure."""
    from impruver.ui import console

    try:
        args = parser().parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        if isinstance(exc, SystemExit):  # --help printed its text
            return int(exc.code or 0)
        raise RunError(f"impruver download: {exc}; usage: impruver download REPO [--repo-type model|dataset] "
                       "[--dest DIR] [--revision R]") from None
    folder = download(args.repo, repo_type=args.repo_type, dest=args.dest, revision=args.revision)
    console.print(f"downloaded {args.repo} to {folder}\n  use it:  impruver {override(folder, args.repo_type)}",
                  markup=False, highlight=False, soft_wrap=True)
    return 0


def override(folder: str | Path, repo_type: str) -> str:
    """The override that points a plan at the downloaded folder, quoted for the shell."""
    key = "model.path" if repo_type == "model" else "dataset.sources.NAME.path"
    return shlex.quote(f"{key}={folder}")


def download(repo_id: str, *, repo_type: str = "model", dest: str | None = None, revision: str | None = None) -> Path:
    """``snapshot_download`` with every failure turned into one line that says what to do.

    Raises:
        RunError: a malformed id, the Hub off or unreachable (and no cached copy), a gated, missing or private
            repository, an unknown revision.
    """
    if not HUB_ID.match(repo_id):
        raise RunError(f"impruver download: '{repo_id}' is not a Hub id (owner/name, e.g. "
                       "ai-forever/rugpt3small_based_on_gpt2)")
    if offline():
        return _cached(repo_id, repo_type, dest, revision)
    if not reachable():
        raise RunError(f"impruver download: the Hugging Face Hub ({endpoint()}) cannot be reached from here; run "
                       f"this on a machine with network access and copy the folder over (or set HF_ENDPOINT to a "
                       f"mirror you can reach)")
    return Path(_snapshot(repo_id, repo_type=repo_type, dest=dest, revision=revision, local_files_only=False)).resolve()


def _cached(repo_id: str, repo_type: str, dest: str | None, revision: str | None) -> Path:
    """HF_HUB_OFFLINE is set: the cached copy if there is one, else the line that says how to get it."""
    try:
        return Path(_snapshot(repo_id, repo_type=repo_type, dest=dest, revision=revision, local_files_only=True))
    except RunError:
        raise RunError(f"impruver download: HF_HUB_OFFLINE is set and {repo_id} is not in the cache; unset "
                       "HF_HUB_OFFLINE on a machine with network access (or copy the folder over)") from None


def _snapshot(repo_id: str, **kwargs: Any) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    name = f"{kwargs['repo_type']} {repo_id}"
    page = f"{endpoint()}/{'datasets/' if kwargs['repo_type'] == 'dataset' else ''}{repo_id}"
    try:
        return str(snapshot_download(repo_id, local_dir=kwargs.pop("dest"), etag_timeout=ETAG_TIMEOUT_S,
                                     library_name="impruver", **kwargs))
    except GatedRepoError:
        raise RunError(f"impruver download: {name} is gated; accept its terms at {page} and log in "
                       "(hf auth login, or set HF_TOKEN), then run this again") from None
    except RevisionNotFoundError:
        raise RunError(f"impruver download: {name} has no revision '{kwargs.get('revision')}'; see the branches "
                       f"and tags at {page}") from None
    except RepositoryNotFoundError:
        other = "dataset" if kwargs["repo_type"] == "model" else "model"
        raise RunError(f"impruver download: no {name} on the Hub (or it is private: log in with hf auth login); "
                       f"check the id, or add --repo-type {other} if it is a {other}") from None
    except LocalEntryNotFoundError:
        raise RunError(f"impruver download: {name} is not in the cache and the Hub was not asked") from None
    except (OSError, *_http_client_errors()) as exc:  # the connection dropped mid-download, disk full, ...
        raise RunError(f"impruver download: {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                       ) from None


def _http_client_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's own error base, which huggingface_hub's HTTP errors extend (requests' is an OSError;
    httpx's is not): taken from HfHubHTTPError's bases, so that a lost connection is one line, not a traceback."""
    from huggingface_hub.errors import HfHubHTTPError

    return tuple(c for c in HfHubHTTPError.__mro__[1:]
                 if issubclass(c, Exception) and c.__module__.split(".")[0] not in ("builtins", "huggingface_hub"))
