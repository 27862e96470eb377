"""A full disk while writing a run's files: remove what was half written and say where, in one line."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path


class DiskFullError(OSError):
    """No space left while writing one of the run's files; its half-written copies were removed."""


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def cleaned_up_on_disk_full(at: Path, *half_written: Path) -> Iterator[None]:
    """Run the body; on ENOSPC delete ``half_written`` (temporary copies) and raise :class:`DiskFullError`.

    The previous complete file is never among them, so a full disk costs the new write and nothing else.
    """
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC or isinstance(err, DiskFullError):
            raise
        for path in half_written:
            remove_path(path)
        raise DiskFullError(f"disk full at {at} (free space there and run the same command again: it resumes "
                            "from the newest complete checkpoint)") from None
