"""Writes one section of benchmarks/RESULTS.md, leaving the other sections as they are.

Each benchmark owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``;
a header with machine, versions and command is added to every section.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import platform
import re
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
_TITLE = "# Benchmark results\n\nEach section is written by the script named in it; rerun that script to refresh it.\n"


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "-"


def machine_line(packages=("jax", "jaxlib", "flax", "optax", "numpy")) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  devs = jax.devices()
  dev = f"{devs[0].platform}:{getattr(devs[0], 'device_kind', '?')} x{len(devs)}"
  cpu = platform.processor() or platform.machine()
  vers = ", ".join(f"{p} {_version(p)}" for p in packages)
  return (f"Machine: {platform.node()} ({cpu}, {os.cpu_count()} cores), device {dev}; "
          f"Python {platform.python_version()}; {vers}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")


def write_section(name: str, title: str, body: str, *, command: str | None = None,
                  packages=("jax", "jaxlib", "flax", "optax", "numpy")) -> None:
  """Replaces (or appends) the section ``name`` of RESULTS.md with ``body``."""
  command = command or "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
  text = (f"<!-- BEGIN {name} -->\n## {title}\n\n{machine_line(packages)}\n\n"
          f"Command: `{command}`\n\n{body.rstrip()}\n<!-- END {name} -->\n")
  with open(RESULTS + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    old = open(RESULTS).read() if os.path.exists(RESULTS) else _TITLE
    pat = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->\n?", re.S)
    new = pat.sub(lambda m: text, old) if pat.search(old) else old.rstrip() + "\n\n" + text
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
      f.write(new)
    os.replace(tmp, RESULTS)
