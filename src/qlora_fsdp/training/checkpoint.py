"""Atomic files and directories: a run killed mid-save leaves the last good checkpoint whole.

Everything is written under a temporary name in the same directory and renamed into place (`os.replace`
is atomic on one file system). Checkpoint directories are `checkpoint-<step>`; the newest complete one
is found by scanning, so a half-written `*.tmp` directory is simply ignored (and removed on the next save).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it is process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o22)
    os.umask(umask)
    return umask


def with_user_mode(path: Path, directory: bool = False) -> Path:
    """chmod `path` to what mkdir / open would have given it under the process umask (tempfile makes 0700 / 0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
    return Path(path)


@contextmanager
def atomic_dir(final: Path):
    """Yields a temporary directory next to `final`; on success it replaces `final` whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = with_user_mode(tempfile.mkdtemp(prefix=final.name + ".", suffix=".tmp", dir=final.parent), directory=True)
    try:
        yield tmp
        if final.exists():
            old = final.with_name(final.name + ".old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(with_user_mode(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories under `output_dir`, oldest first."""
    out = []
    if Path(output_dir).is_dir():
        for p in Path(output_dir).iterdir():
            m = _CKPT.match(p.name)
            if m and p.is_dir() and (p / "trainer_state.pt").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1][1] if dirs else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints; remove leftovers of interrupted saves."""
    for p in Path(output_dir).glob("checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    dirs = checkpoint_dirs(output_dir)
    for _, p in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
