"""Start-up checks the supervisor makes before it forks any worker.

An unusable data dir or object store URL must be one line naming the option and exit
code 2, not a traceback in every worker. The object store URL is resolved by SlateDB in
a short-lived forked child: the supervisor itself must never start SlateDB's native
runtime (perf-facts.md: children forked after that hang).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from silo.config import Config

EXIT_BAD_START = 2


class StartupError(Exception):
    """A one-line reason the server cannot start (printed as `silo: <reason>`, exit 2)."""


def check_data_dir(data_dir: Path) -> None:
    """The data dir exists (or can be created) as a writable directory."""
    label = "storage.data_dir (SILO_DATA_DIR / --data-dir)"
    if data_dir.exists() and not data_dir.is_dir():
        raise StartupError(f"{label} {str(data_dir)!r} is not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"{label}: cannot create {str(data_dir)!r}: "
                           f"{e.strerror or e}") from None
    probe = data_dir / f".silo-write-check-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StartupError(f"{label} {str(data_dir)!r} is not writable: "
                           f"{e.strerror or e}") from None


def check_object_store_url(config: Config) -> None:
    """The object store URL names a store SlateDB can resolve; a local one is usable."""
    from silo.storage.database import split_store_url  # noqa: PLC0415 - keeps this module light

    label = "storage.object_store_url (SILO_OBJECT_STORE_URL / --object-store-url)"
    url = config.object_store_url_resolved()
    try:
        root, _ = split_store_url(url)
    except ValueError as e:
        raise StartupError(f"{label}: {e}") from None
    u = urlparse(url)
    if u.scheme == "file":
        path = Path(u.path)
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StartupError(f"{label} {url!r}: {str(existing)!r} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StartupError(f"{label} {url!r}: {str(existing)!r} is not writable")
        return
    why = _probe_resolve(root)
    if why:
        raise StartupError(f"{label} {url!r}: {why}")


def _probe_resolve(root: str) -> str:
    """Resolve the store root in a forked child; '' if fine, else SlateDB's reason."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            from slatedb.uniffi import ObjectStore  # noqa: PLC0415

            try:
                ObjectStore.resolve(root)
            except Exception as e:  # noqa: BLE001 - the reason goes back to the parent
                os.write(w, " ".join(str(e).split())[:500].encode())
                code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        chunks.append(f.read())
    _, status = os.waitpid(pid, 0)
    why = b"".join(chunks).decode(errors="replace")
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return ""
    return why or "cannot be resolved"


def run_checks(config: Config) -> None:
    check_data_dir(Path(config.data_dir))
    check_object_store_url(config)


def fail(e: StartupError) -> int:
    print(f"silo: {e}", file=sys.stderr)
    return EXIT_BAD_START
