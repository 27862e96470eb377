"""The preloaded Python of the tests' subprocesses behaves as the real interpreter would, as seen from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import prefork

pytestmark = pytest.mark.timeout(120)


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([prefork.python(), *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_code_argv_cwd_environment_stdin_and_exit_code(tmp_path: Path) -> None:
    code = ("import os, sys, torch; print(sys.argv[1:], os.getcwd(), os.environ['PROBE'], sys.stdin.read(), "
            "sys.executable == os.environ['PROBE_CLIENT']); sys.exit(7)")
    done = _run("-c", code, "a", "b", cwd=tmp_path, input="from stdin",
                env={**os.environ, "PROBE": "42", "PROBE_CLIENT": prefork.python()})
    assert (done.returncode, done.stderr) == (7, "")
    assert done.stdout == f"['a', 'b'] {tmp_path} 42 from stdin True\n"  # what it starts is forked too


def test_scripts_modules_and_uncaught_errors(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.argv)\nraise ValueError('boom')\n")
    done = _run(str(script), "x")
    assert done.returncode == 1 and done.stdout == f"__main__ ['{script}', 'x']\n"
    assert done.stderr.rstrip().endswith("ValueError: boom")
    module = _run("-m", "json.tool", input='{"a": 1}')
    assert (module.returncode, module.stdout) == (0, '{\n    "a": 1\n}\n')


def test_signals_reach_the_command_and_death_by_signal_is_reported() -> None:
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: (print('got SIGTERM', flush=True), sys.exit(3)))\n"
            "print('ready', flush=True)\ntime.sleep(60)")
    proc = subprocess.Popen([prefork.python(), "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3 and proc.stdout.read() == "got SIGTERM\n"
    killed = _run("-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == -signal.SIGKILL


def test_a_killed_client_takes_its_command_along(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    proc = subprocess.Popen([prefork.python(), "-c", code])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    command = int(pid_file.read_text())
    assert command != proc.pid  # the command is the forked process, not the client
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{command}").exists() and "Z" not in _state(command):
        assert time.monotonic() < deadline, "the command outlived its client"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def test_what_the_server_cannot_fork_runs_on_the_real_interpreter() -> None:
    # an option the client does not know, and a PYTHONPATH the server did not import from
    option = _run("-X", "utf8", "-c", "import sys; print(sys.flags.utf8_mode)")
    assert (option.returncode, option.stdout) == (0, "1\n")
    other_path = _run("-c", "import sys; print(sys.path[1])", env={**os.environ, "PYTHONPATH": "/nonexistent"})
    assert (other_path.returncode, other_path.stdout) == (0, "/nonexistent\n")


def test_visible_pids_name_the_client_and_its_parent() -> None:
    code = "from tests import prefork; print(prefork.visible_pid(), prefork.visible_parent_pid())"
    proc = subprocess.Popen([prefork.python(), "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    out, _ = proc.communicate(timeout=60)
    assert out.split() == [str(proc.pid), str(os.getpid())]
    assert sys.executable != prefork.python()
