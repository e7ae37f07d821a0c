"""StateStore: what each channel has learnt, kept on disk between runs, so a known channel starts warm.

One file per channel, `<name>-<hash>.fm2s` in the state directory (the name reduced to
[A-Za-z0-9_-], the hash of the full name keeps names apart): a torch file holding tensors only
(network weights, Adam moments), numbers and one JSON string of metadata (format version, channel,
noise parameters, intensity scaling, frame shape and dtype, frames and steps learnt, time saved).
It is read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers, so a state file can never run code. Writes are atomic: a temporary file in the same
directory, flushed and fsynced, then renamed over the old one (and the directory fsynced), so a
process killed mid-save leaves the previous state intact. A file that is corrupt, truncated, of
another format version or for another channel is reported (file and reason) and ignored: that
channel starts cold, nothing else is affected. An unwritable directory is reported once; the stream
runs without saving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "StateError", "StateStore"]

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the file's content changes meaning; other versions are refused, never guessed at
SUFFIX = ".fm2s"


class StateError(Exception):
    """A state file that cannot be used, with the reason."""


class StateStore:
    """Load and atomically save per-channel learnt state in one directory."""

    def __init__(self, directory: Path | str, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self.saved = 0
        self.save_failures = 0
        self.problems: list[str] = []  # every warning, for reports
        self.writable = False if read_only else self._check_writable()

    def _warn(self, message: str) -> None:
        self.problems.append(message)
        log.warning("%s", message)

    def _check_writable(self) -> bool:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError as exc:
            self._warn(f"state directory {self.directory} is not writable ({exc}); channels will not be saved")
            return False

    def path_for(self, channel: str) -> Path:
        """The channel's file: a safe prefix of its name plus a hash of the whole name."""
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", channel)[:40] or "channel"
        digest = hashlib.sha256(channel.encode()).hexdigest()[:10]
        return self.directory / f"{safe}-{digest}{SUFFIX}"

    def load(self, channel: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(tensors, metadata) saved for `channel`, None if there is none; StateError if unusable."""
        path = self.path_for(channel)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupt, or holding objects the safe loader refuses
            raise StateError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("meta"), str) or \
                not isinstance(data.get("tensors"), dict):
            raise StateError(f"{path}: not an fm2s state file")
        try:
            meta = json.loads(data["meta"])
        except json.JSONDecodeError as exc:
            raise StateError(f"{path}: metadata is not JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StateError(f"{path}: format version {meta.get('format') if isinstance(meta, dict) else '?'}, "
                             f"this program reads version {FORMAT}")
        if meta.get("channel") != channel:
            raise StateError(f"{path}: holds channel {meta.get('channel')!r}, not {channel!r}")
        return data["tensors"], meta

    def save(self, channel: str, tensors: dict[str, Any], meta: dict[str, Any]) -> bool:
        """Atomically replace the channel's file; False (reported) if it could not be written."""
        if not self.writable:
            return False
        path = self.path_for(channel)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        record = {**meta, "format": FORMAT, "channel": channel, "saved_at": time.time()}
        try:
            with open(tmp, "wb") as f:
                torch.save({"meta": json.dumps(record), "tensors": tensors}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.save_failures += 1
            self._warn(f"could not save channel {channel!r} to {path} ({exc}); the previous state is kept")
            tmp.unlink(missing_ok=True)
            return False
        self.saved += 1
        return True

    def entries(self) -> list[dict[str, Any]]:
        """Metadata of every state file in the directory (unusable ones with their `problem`)."""
        out: list[dict[str, Any]] = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                meta = json.loads(data["meta"])
                if not isinstance(meta, dict):
                    raise ValueError("metadata is not an object")
                out.append({"file": path.name, **meta})
            except Exception as exc:
                out.append({"file": path.name, "problem": f"{type(exc).__name__}: {str(exc)[:120]}"})
        return out
