"""`bayeslora serve` as a process: loopback server, user errors, clean SIGTERM shutdown with in-flight requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_missing_run_dir_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bayeslora.cli", "serve", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=_env(), timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_serve_bad_or_busy_port_is_a_one_line_error_before_the_model_loads():
    def serve(port) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bayeslora.cli", "serve", "--model", "no-such-model-spec",
                               "--port", str(port)], capture_output=True, text=True, env=_env(), timeout=120,
                              check=False)

    proc = serve(99999)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "[1, 65535]" in proc.stderr
    with socket.socket() as busy:  # a listening socket holds the port; the model spec is never reached
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = serve(busy.getsockname()[1])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "Cannot listen on 127.0.0.1:" in proc.stderr and "choose another --port" in proc.stderr


def test_sigterm_lets_the_in_flight_request_finish():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bayeslora.cli", "serve", "--model", "tiny-random-llama",
                             "--port", str(port), "--max-tokens", "120", "--log-level", "warning"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        body = {"model": "tiny-random-llama", "prompt": "x", "max_tokens": 120, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, trust_env=False, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:  # wait until generation is under way, then ask the server to stop
                if line.startswith("data: "):
                    events.append(line)
                    break
            proc.send_signal(signal.SIGTERM)
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        finals = [json.loads(e[6:]) for e in events[:-1]]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
        assert finals[-1]["choices"][0]["confidence"]["n_tokens"] == 120
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown: exit status 0 or -SIGTERM
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_capped_default_sample_count_is_said(tiny_stochastic_run):
    from bayeslora.cli_serve import capped_samples_note
    from bayeslora.serve import InferenceService, ServeSettings

    def note(**settings):
        return capped_samples_note(InferenceService(tiny_stochastic_run, ServeSettings(**settings)))

    assert "S = 2 (--max-samples)" in note(max_samples=2) and "its own default is 4" in note(max_samples=2)
    assert note(max_samples=4) is None and note(max_samples=2, samples=2) is None
