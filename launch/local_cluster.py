r"""Runs a multi-process JAX job on this machine, one process per fake host.

  python -m launch.local_cluster --num_processes=2 --devices_per_process=2 \
      -- python -m launch.train --config=nth_farthest:cpu --workdir=DIR

Starts `--num_processes` copies of the command after `--`, each with
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I`
appended (PORT: a free loopback port) and, with `--devices_per_process`,
that many fake CPU devices (XLA_FLAGS; JAX_PLATFORMS=cpu unless set). Every
line a process prints is printed with its id in front (`[1] ...`), on the
stream it was printed on; the processes' ids and pids are printed first
(`local_cluster: process 1 is pid 1234`).

Guarantees:
  * every process runs in its own process group, and no process (nor
    anything it started) is left when the runner exits;
  * when a process fails (exits non-zero or is killed), the others get
    SIGTERM, then SIGKILL after --grace_seconds; the runner exits with the
    first failure's code (128 + N for a process killed by signal N);
  * SIGTERM or SIGINT to the runner is forwarded to every process (the
    training loop saves a checkpoint and stops); they are killed if still
    running --grace_seconds later;
  * exit code 0 when every process exited with 0.
Bad flags: one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from launch import common

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2,
                                      "Processes to start.")
_DEVICES = flags.DEFINE_integer(
    "devices_per_process", 0,
    "Fake CPU devices per process (0: leave XLA_FLAGS and JAX_PLATFORMS as "
    "they are).")
_GRACE = flags.DEFINE_float(
    "grace_seconds", 30.0,
    "After a failure or a forwarded signal, how long the processes get to "
    "stop before they are killed.")

_POLL_S = 0.1


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  if devices:
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _relay(stream, out, prefix: str) -> None:
  """Copies `stream` to `out` line by line with `prefix` in front."""
  for line in iter(stream.readline, b""):
    out.buffer.write(prefix.encode() + line)
    out.buffer.flush()
  stream.close()


def _returncode(code: int) -> int:
  return 128 - code if code < 0 else code


class _Cluster:
  """The child processes, each in its own process group."""

  def __init__(self, command: list[str], num_processes: int, devices: int):
    address = f"127.0.0.1:{free_port()}"
    env = _env(devices)
    self.procs, self._relays = [], []
    for i in range(num_processes):
      argv = command + [f"--coordinator_address={address}",
                        f"--num_processes={num_processes}",
                        f"--process_id={i}"]
      proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)
      self.procs.append(proc)
      print(f"local_cluster: process {i} is pid {proc.pid}", file=sys.stderr,
            flush=True)
      for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
        relay = threading.Thread(target=_relay, args=(stream, out, f"[{i}] "),
                                 daemon=True)
        relay.start()
        self._relays.append(relay)

  def signal_all(self, signum: int) -> None:
    """Sends `signum` to the process group of every process."""
    for proc in self.procs:
      try:
        os.killpg(proc.pid, signum)
      except ProcessLookupError:  # The group is gone already.
        pass

  def failed(self) -> int | None:
    """The exit code of the first process seen to have failed, or None."""
    for proc in self.procs:
      code = proc.poll()
      if code:
        return _returncode(code)
    return None

  def running(self) -> bool:
    return any(proc.poll() is None for proc in self.procs)

  def stop(self, signum: int, grace_s: float) -> None:
    """`signum` to every group, SIGKILL to all groups after `grace_s`."""
    self.signal_all(signum)
    deadline = time.monotonic() + grace_s
    while self.running() and time.monotonic() < deadline:
      time.sleep(_POLL_S)
    # Also reaps what the processes started and left behind.
    self.signal_all(signal.SIGKILL)
    for proc in self.procs:
      proc.wait()
    for relay in self._relays:
      relay.join(timeout=5)


def run(command: list[str], num_processes: int, devices: int,
        grace_s: float) -> int:
  """Runs the cluster to completion (see the module docstring); its exit code."""
  forwarded = []

  def forward(signum, frame):
    del frame
    forwarded.append(signum)

  previous = {sig: signal.signal(sig, forward)
              for sig in (signal.SIGTERM, signal.SIGINT)}
  cluster = None
  try:
    cluster = _Cluster(command, num_processes, devices)
    code = None
    while cluster.running() and code is None and not forwarded:
      time.sleep(_POLL_S)
      code = cluster.failed()
    if code is not None:
      print(f"local_cluster: a process failed with exit code {code}; "
            "stopping the others.", file=sys.stderr, flush=True)
      cluster.stop(signal.SIGTERM, grace_s)
      return code
    if forwarded:
      cluster.stop(forwarded[0], grace_s)
    else:
      cluster.stop(signal.SIGKILL, 0)  # Nothing runs; reaps leftovers.
    return cluster.failed() or 0
  finally:
    if cluster is not None:
      cluster.signal_all(signal.SIGKILL)
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def main(argv):
  command = argv[1:]
  if not command:
    common.fail("give the command to run after --, e.g. -- python -m "
                "launch.train --config=... --workdir=...")
  if _NUM_PROCESSES.value < 1 or _DEVICES.value < 0 or _GRACE.value < 0:
    common.fail("--num_processes must be >= 1, --devices_per_process and "
                "--grace_seconds >= 0.")
  sys.exit(run(command, _NUM_PROCESSES.value, _DEVICES.value, _GRACE.value))


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    common.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
