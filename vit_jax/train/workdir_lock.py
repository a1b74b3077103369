"""One run per workdir: an advisory lock held by process 0 for the whole run.

``hold(workdir)`` takes ``WORKDIR/.lock`` with ``flock``; a second ``train.py`` on the same
workdir is refused with the holder's process id, host, start time and command. The kernel drops
the lock when its process dies (SIGKILL included), so a killed run leaves nothing to clean up:
the next run takes the lock over and resumes. Only process 0 of a multi-process run holds it
(its peers write through it). On an object store (``gs://...``) there are no file locks: nothing
stops a second run there, so give each run its own workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

import jax

LOCK_FILE = ".lock"


class WorkdirInUseError(ValueError):
  """Another run holds the workdir."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds ``workdir``'s lock for the ``with`` block (process 0 on a local file system)."""
  if jax.process_index() != 0 or "://" in workdir:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = _open_lock_file(workdir, path)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirInUseError(f"the workdir {workdir} is in use by another run ({_holder(path)}); "
                              "wait for it to end or stop it, or give this run another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join(sys.argv)}).encode())
    yield
  finally:
    os.close(fd)  # releases the lock


def _open_lock_file(workdir: str, path: str) -> int:
  """The lock file's descriptor; a workdir that is a file or cannot be written is a ValueError
  naming it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a directory: give a directory (created "
                     "if missing)")
  try:
    os.makedirs(workdir, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise ValueError(f"--workdir {workdir} cannot be written ({e.strerror}): give a directory "
                     "this user can create and write") from None


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      h = json.load(f)
    return f"process {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
  except (OSError, ValueError, KeyError):
    return "a process that has not written its name yet"
