"""Keep freed host memory in the process instead of handing it back to the OS (glibc only).

XLA:CPU allocates every temporary buffer of a step with the system malloc. glibc serves blocks
over 32 MiB with fresh `mmap`s, trims the heap top once more than 128 KiB is free, and gives
each XLA worker thread its own arena, so each train step maps, zero-fills (page faults) and
unmaps its activations again: page faults and kernel time that this module removes (figures
in docs/performance.md, "Host malloc").

The settings must be in place before JAX starts its thread pools (the first computation), so
the commands that run the decoder in their own process (`pasr_jax.cli.main`: train, sft, plan,
devices) apply them first. Processes that do not (vLLM's engine loading rollout.vllm_internals,
the judge server, evaluate's client) keep glibc's defaults: vLLM's reloads were measured slower
and uneven under these settings. `PASR_JAX_HOST_MALLOC=system` leaves glibc's defaults alone.
On GPU hosts (an NVIDIA driver present, unless JAX_PLATFORMS=cpu) nothing is changed: XLA:GPU
keeps its buffers on the device, and the host then serves vLLM, NCCL and pinned transfers,
which glibc's defaults suit. Memory that is freed stays reserved for the next step: the process's resident
size stays at its peak instead of breathing in and out every step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV = "PASR_JAX_HOST_MALLOC"
# Present on a host whose NVIDIA kernel driver is loaded.
NVIDIA_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidiactl")


def cpu_run(env: dict[str, str] | os._Environ, nvidia_driver: bool) -> bool:
  """Whether JAX will compute on the CPU: JAX_PLATFORMS names only cpu, or it is unset and
  the host has no NVIDIA driver."""
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms == ["cpu"]
  return not nvidia_driver


def keep_freed_memory() -> bool:
  """Tune glibc malloc to reuse freed blocks (no mmap per large block, no trimming, one arena).

  Returns True when the settings were applied; False on non-glibc systems, on GPU hosts
  (`cpu_run`), or when `PASR_JAX_HOST_MALLOC=system` opts out. Safe to call more than once.
  """
  if os.environ.get(ENV, "").lower() == "system" or not sys.platform.startswith("linux"):
    return False
  if not cpu_run(os.environ, any(os.path.exists(p) for p in NVIDIA_PATHS)):
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other libcs have no mallopt
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # Trim threshold -1 becomes SIZE_MAX inside glibc (the int is converted to size_t): never
  # trim. The largest positive int (2 GiB) is too small: a step frees more than that at once.
  ok = [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, -1), mallopt(_M_ARENA_MAX, 1)]
  return all(r == 1 for r in ok)
