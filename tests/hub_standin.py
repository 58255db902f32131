"""A recording stand-in for the network part of ``huggingface_hub.HfApi``.

Each repo's files live in a local folder, so a test can push, look at what the Hub would hold,
and download it again. Patterns are matched with huggingface_hub's own ``filter_repo_objects``,
and ``upload_folder`` applies ``delete_patterns`` as huggingface_hub 2.4 does: remote files that
match are removed unless the same commit uploads them, and ``.gitattributes`` is never removed."""

import shutil
import tempfile
from pathlib import Path

from huggingface_hub.utils import filter_repo_objects


def _matching(paths, patterns) -> set[str]:
    return set(filter_repo_objects(sorted(paths), allow_patterns=patterns))


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


class RecordingHfApi:
    """Records calls; fails the first ``failures_left`` uploads like a dropped link."""

    def __init__(self, root=None, failures_left: int = 1):
        self.root = Path(root or tempfile.mkdtemp(prefix="hub-standin-"))
        self.calls = []
        self.failures_left = failures_left
        self.uploaded: list[str] = []
        self.deleted: list[str] = []

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def remote_files(self, repo_id: str) -> set[str]:
        return _files(self.repo_dir(repo_id))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        self.repo_dir(repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, **kwargs):
        repo_id, folder = kwargs["repo_id"], Path(kwargs["folder_path"])
        self.calls.append(("upload_folder", repo_id, kwargs))
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("connection reset by peer")
        local = _files(folder)
        uploaded = local - _matching(local, kwargs.get("ignore_patterns") or [])
        remote = self.repo_dir(repo_id)
        patterns = kwargs.get("delete_patterns")
        doomed = _matching(self.remote_files(repo_id), patterns) if patterns else set()
        self.deleted = sorted(doomed - uploaded - {".gitattributes"})
        for name in self.deleted:
            (remote / name).unlink()
        for name in uploaded:
            (remote / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, remote / name)
        self.uploaded = sorted(uploaded)
        return type("Commit", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()

    def snapshot_download(self, repo_id, *, local_dir, allow_patterns=None, **kwargs):
        self.calls.append(("snapshot_download", repo_id, {"allow_patterns": allow_patterns, **kwargs}))
        remote = self.repo_dir(repo_id)
        if not remote.is_dir():
            raise FileNotFoundError(f"404: repository {repo_id} not found")
        files = self.remote_files(repo_id)
        for name in _matching(files, allow_patterns) if allow_patterns else files:
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(remote / name, Path(local_dir) / name)
        return str(local_dir)
