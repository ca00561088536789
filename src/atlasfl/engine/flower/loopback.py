"""A Flower deployment on 127.0.0.1: one SuperLink and N SuperNodes, for tests and benchmarks.

``Loopback`` starts ``flower-superlink`` and one ``flower-supernode`` per client on free ports
(insecure: loopback only), each in its own session, with a private ``FLWR_HOME`` holding the
SuperLink connection (``loopback``); ``submit`` runs ``flwr run`` and ``status`` reads the run's
status with ``flwr ls`` (``flwr run``'s exit code does not tell whether the run failed).
``close`` stops every process it started, and their children, by PID (process group).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from atlasfl.engine.flower.server_app import FLOWER_ENV

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parents[4] / "examples" / "flower"  # in a source checkout


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Loopback:
    """SuperLink + SuperNodes on 127.0.0.1; use as a context manager."""

    def __init__(self, home: Path, node_configs: list[str], *, threads: int = 1):
        """``home``: an empty folder (FLWR_HOME and logs); one node per ``node_configs`` entry."""
        self.home, self.node_configs = Path(home), node_configs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.link, *self.node_ports = free_ports(1 + len(node_configs))
        # the SuperLink and SuperNodes start flower-superexec and flwr-* helpers found on PATH
        self.env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home / "flwr"),
                    "OMP_NUM_THREADS": str(threads),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.logs = self.home / "logs"

    def __enter__(self) -> Loopback:
        (self.home / "flwr").mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        # the SuperLink connection lives in FLWR_HOME's config.toml, never in the app's pyproject
        (self.home / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.link}"\ninsecure = true\n')
        try:
            self._start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
                        "--port", str(self.link))
            self._wait_port(self.link, 60)
            for i, (port, conf) in enumerate(zip(self.node_ports, self.node_configs,
                                                 strict=True)):
                self._start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink",
                            f"127.0.0.1:{self.link}", "--port", str(port), "--node-config", conf)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self, name: str, *args: str) -> None:
        with (self.logs / f"{name}.log").open("w") as log:
            self.procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    @staticmethod
    def _wait_port(port: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds:g} s")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment."""
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, run_config: str, app: Path = APP) -> str:
        """``flwr run`` the app with ``run_config``; returns the run id."""
        out = self.flwr("run", str(app), "loopback", "--format", "json",
                        "--run-config", run_config)
        try:
            answer = json.loads(out.stdout)
        except json.JSONDecodeError:
            answer = {}
        if not answer.get("success"):
            raise RuntimeError(f"flwr run failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        return str(answer["run-id"])

    def run_info(self, run_id: str) -> dict[str, Any]:
        """The run's row of ``flwr ls --format json`` (``status``, ``network-traffic``...)."""
        out = self.flwr("ls", "loopback", "--run-id", run_id, "--format", "json")
        try:
            runs = json.loads(out.stdout)["runs"]
        except (json.JSONDecodeError, KeyError):
            return {"status": f"unreadable: {out.stdout[-300:]} {out.stderr[-300:]}"}
        return dict(runs[0]) if runs else {"status": "absent"}

    def wait(self, run_id: str, seconds: float) -> dict[str, Any]:
        """Poll ``flwr ls`` until the run is ``finished:*`` or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        info = self.run_info(run_id)
        while not str(info["status"]).startswith("finished") and time.monotonic() < deadline:
            time.sleep(2)
            info = self.run_info(run_id)
        return info

    def log_tails(self, chars: int = 3000) -> str:
        """The end of every process's log, for a failure message."""
        return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}"
                         for p in sorted(self.logs.iterdir()))

    def close(self) -> None:
        """Stop every process started here, with its children, by its PID (process group)."""
        for proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
