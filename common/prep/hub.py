"""HuggingFace Hub access for the preprocessed dataset: token check, resumable upload, download."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from common.errors import ConfigurationError, UserError
from common.files import retry_with_backoff
from common.schema import DATA_DIR, MANIFEST_NAME, STATE_DIR, split_of_shard, split_shard_pattern

# Resume bookkeeping and writer temporaries stay local.
UPLOAD_IGNORE = [f"{STATE_DIR}/*", "**/.tmp-*", ".tmp-*"]


def require_hf_token() -> str:
    """The Hub token (HF_TOKEN or `hf auth login`), or exit 2 with how to provide one."""
    token = get_token()
    if not token:
        raise ConfigurationError(
            "no HuggingFace token found, so the dataset cannot be pushed. Set HF_TOKEN or run "
            "`hf auth login`, or pass --no-push to keep the output local."
        )
    return token


def describe_hub_error(repo_id: str, exc: Exception, cache=None) -> str:
    """One line for a failed Hub download: not found, private, gated, or no network."""
    login = "set HF_TOKEN or run `hf auth login`"
    if isinstance(exc, GatedRepoError):
        return (f"dataset {repo_id} is gated: accept its terms at https://huggingface.co/datasets/{repo_id} "
                f"and {login} with that account")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"dataset {repo_id} was not found on the Hub: check the name (owner/name), or, if it is "
                f"private, {login} with an account that can read it")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"the Hub refused dataset {repo_id} (HTTP {status}: {first})"
    where = f" and it is not in the cache {cache}" if cache is not None else ""
    if isinstance(exc, LocalEntryNotFoundError):
        return (f"dataset {repo_id} cannot be downloaded (no network, or HF_HUB_OFFLINE is set){where}; "
                "connect once without HF_HUB_OFFLINE, or use --dataset/--demo")
    return f"cannot reach the Hub for dataset {repo_id} ({exc.__class__.__name__}: no network?){where}"


def make_hub_api(token: str | None):
    """The HfApi client (a seam: tests substitute a recording stand-in for the network part).

    ``None`` uses the stored login if there is one; public datasets download without it.
    """
    return HfApi(token=token)


def local_splits(folder: str | os.PathLike) -> list[str]:
    """The splits that have shards in a local dataset folder."""
    names = (path.name for path in (Path(folder) / DATA_DIR).glob("*.parquet"))
    return sorted({split for split in map(split_of_shard, names) if split})


def stale_shard_patterns(folder: str | os.PathLike) -> list[str] | None:
    """``delete_patterns`` that drop every remote shard of the splits ``folder`` holds.

    ``upload_folder`` keeps remote files that the same commit uploads, so these patterns remove
    exactly the shards a new shard count no longer names (a 3-shard split pushed again as 2 would
    otherwise keep its old third shard and serve its rows twice). Other splits and files stay.
    """
    return [split_shard_pattern(split) for split in local_splits(folder)] or None


def push_dataset(folder: str | os.PathLike, repo_id: str, token: str, attempts: int = 5, api=None) -> str:
    """Upload a dataset folder to a Hub dataset repo; returns the commit URL.

    ``upload_folder`` skips files already committed and deduplicates uploaded chunks, so each
    retry (and a rerun after an interruption) resumes rather than starts over. The commit also
    removes remote shards of the pushed splits that the folder no longer has.
    """
    api = api or make_hub_api(token)
    folder = Path(folder)
    retry_with_backoff(
        lambda: api.create_repo(repo_id, repo_type="dataset", exist_ok=True),
        attempts=attempts,
        describe=f"creating dataset repo {repo_id}",
    )
    commit = retry_with_backoff(
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="dataset",
            ignore_patterns=UPLOAD_IGNORE,
            delete_patterns=stale_shard_patterns(folder),
            commit_message="Upload preprocessed OpenEDS shards",
        ),
        attempts=attempts,
        describe=f"uploading {folder} to {repo_id}",
    )
    return str(getattr(commit, "commit_url", commit))


def download_dataset(repo_id: str, dest: str | os.PathLike, splits: list[str], api=None) -> Path:
    """Fetch a Hub dataset's manifest, card and the shards of ``splits`` into ``dest`` (Hub layout)."""
    api = api or make_hub_api(None)
    patterns = [MANIFEST_NAME, "README.md"] + [split_shard_pattern(split) for split in splits]
    # The older layout of Conner/openeds-precomputed: one folder per split (data/train/shard_00000.parquet).
    patterns += [f"{DATA_DIR}/{split}/*.parquet" for split in splits]
    try:
        path = retry_with_backoff(
            lambda: api.snapshot_download(repo_id, repo_type="dataset", local_dir=str(dest),
                                          allow_patterns=patterns),
            describe=f"downloading {repo_id}",
        )
    except Exception as exc:  # after the retries: a missing repo, no network, no access
        reason = f"{exc.__class__.__name__}: {exc}"
        raise UserError(f"could not download dataset {repo_id} from the Hub: {reason}") from None
    return Path(path)
