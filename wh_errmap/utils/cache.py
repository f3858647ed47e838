"""The cache root, and XLA's persistent compilation cache under it.

Compiling a training step on the CPU takes 5-20 s, mostly LLVM code generation (the random
parameter initialisers alone take ~9 s). JAX's persistent cache stores compiled programs by
a fingerprint of the program, compiler flags and backend, so a run started again (resume,
predict after training, the next fold) and identical programs built by different Python
closures reuse them instead of compiling again.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax


def default_cache_dir() -> Path:
  """$WH_ERRMAP_CACHE, or ~/.cache/wh_errmap."""
  return Path(os.environ.get("WH_ERRMAP_CACHE") or Path.home() / ".cache" / "wh_errmap")


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> Path:
  """Turns on the persistent compilation cache in `<cache_dir>/xla` (default root if empty).

  Every compiled program is kept, however quick its compilation: on 2 CPU cores even small
  ones take a second. Returns the folder.
  """
  folder = Path(cache_dir or default_cache_dir()) / "xla"
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder
