"""Run inside `unshare --net --pid --fork --mount-proc` by tests/test_submit.py: bring loopback up, start a one-node
Ray cluster in a temporary folder, and drive `patho-r1 submit` against it three times (a first run, a `--resume`, a
run interrupted with Ctrl-C while tailing); with a second recipe, join a second node and submit it (a phase whose
workers must land on different nodes); then submit from a client that has not turned token auth on (the head asks
for it from the start); print one JSON line with each step's exit code and output.  The network
namespace has loopback only, so the head's ports are reachable from nowhere else, and `ray stop` sees only this
namespace's processes.

    python tests/ray_cluster.py RECIPE OUTPUT_ROOT RAY_TEMP_DIR [SPREAD_RECIPE SPREAD_OUTPUT_ROOT]

RAY_TEMP_DIR must be short: Ray's Unix sockets live under it, and a socket path may not pass 107 bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ADDRESS = "http://127.0.0.1:8265"
RAY = str(Path(sys.executable).parent / "ray")  # the environment's own ray, whether or not its bin is on PATH


def submit(recipe: str, out: str, *extra: str, timeout: float = 420) -> dict:
    done = subprocess.run([sys.executable, "-m", "patho_r1.launch.cli", "submit", recipe, "--address", ADDRESS,
                           "--output-root", out, *extra], capture_output=True, text=True, timeout=timeout)
    return {"rc": done.returncode, "out": done.stdout[-6000:], "err": done.stderr[-3000:]}


def interrupted(recipe: str, out: str) -> dict:
    """Submit, wait until the client tails the job's logs, press Ctrl-C; then ask the cluster whether the job still
    runs (it must), and stop it: waiting for it to end would prove nothing more.  `out` is this step's own output
    root, so the stopped job leaves nothing half-written where the other steps' outputs are checked."""
    proc = subprocess.Popen([sys.executable, "-m", "patho_r1.launch.cli", "submit", recipe, "--address", ADDRESS,
                             "--output-root", out, "--phases", "eval"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.time() + 120
    while "submitted" not in seen and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    # Ctrl-C while the client tails the logs: two seconds after the submission, when the job's driver is still
    # starting (its imports alone take longer).  Waiting for the job's first log line instead raced the job's end on a
    # loaded machine, where the tail delivered that line with the rest.
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    job = next((w for w in (seen + stdout).split() if w.strip("'\".,").startswith("raysubmit_")), None)
    status = ""
    if job:
        job = job.strip("'\".,")
        status = subprocess.run([RAY, "job", "status", job, "--address", ADDRESS], capture_output=True, text=True,
                                timeout=60).stdout
        # no waiting for it to wind down: its output root is its own, and the cluster goes with the namespace
        subprocess.run([RAY, "job", "stop", job, "--address", ADDRESS, "--no-wait"], capture_output=True, timeout=120)
    return {"rc": proc.returncode, "out": (seen + stdout)[-3000:], "err": stderr[-3000:], "job": job,
            "status": status[-2000:]}


def token_auth(recipe: str, out: str) -> dict:
    """The head asks for token auth; a client that has not turned it on is refused in one line."""
    client_env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    done = subprocess.run([sys.executable, "-m", "patho_r1.launch.cli", "submit", recipe, "--address", ADDRESS,
                           "--output-root", out, "--no-wait"], capture_output=True, text=True, timeout=120,
                          env=client_env)
    return {"rc": done.returncode, "out": done.stdout[-2000:], "err": done.stderr[-2000:]}


def main() -> int:
    recipe, out, temp = sys.argv[1:4]
    # A shell's background job starts with SIGINT ignored, and a child keeps an ignored signal across exec (CI run as
    # `.ci/run &` did: the "interrupted" client never saw its Ctrl-C).  A handled one is reset to the default on
    # exec, so every client started here takes Ctrl-C as a user's terminal would give it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path(temp).mkdir(parents=True, exist_ok=True)
    # The head runs from an activated environment, as on a real node: a job's `python` is that environment's.  It
    # asks for token auth (one head for every step: a second start costs half a minute); the submitting clients
    # here have turned it on (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token), the last one has not.
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    steps, seconds, t0 = {}, {}, time.time()
    subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, check=True)

    def step(name: str, result: dict) -> None:  # each step's wall time, printed with the results: where CI time goes
        nonlocal t0
        steps[name], seconds[name], t0 = result, round(time.time() - t0, 1), time.time()

    started = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6379",
                              "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--num-cpus=2",
                              f"--temp-dir={temp}", "--disable-usage-stats"], capture_output=True, text=True)
    if started.returncode:
        print(f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}", file=sys.stderr)
        return 1
    step("head", {"rc": started.returncode})
    try:
        step("first", submit(recipe, out))
        step("resumed", submit(recipe, out, "--resume"))
        step("interrupted", interrupted(recipe, f"{out}-interrupted"))
        if len(sys.argv) > 5:  # a second node (its own raylet, one CPU), then a phase spread over both nodes
            joined = subprocess.run([RAY, "start", "--address=127.0.0.1:6379", "--node-ip-address=127.0.0.1",
                                     "--num-cpus=1", "--disable-usage-stats"], capture_output=True, text=True)
            step("second_node", {"rc": joined.returncode, "out": joined.stdout[-2000:], "err": joined.stderr[-2000:]})
            step("spread", submit(sys.argv[4], sys.argv[5]))
        step("token_auth", token_auth(recipe, out))
    finally:
        # Every process of this PID namespace ends with it; SIGKILL them now rather than `ray stop --force`, which
        # spent ~24 s of the test waiting on them.  Only as the namespace's init (pid 1): anywhere else, kill(-1)
        # would reach every process of the user's.
        if os.getpid() == 1:
            os.kill(-1, signal.SIGKILL)
        else:
            subprocess.run([RAY, "stop", "--force"], capture_output=True)
        seconds["stop"], steps["seconds"] = round(time.time() - t0, 1), seconds
    print(json.dumps(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
