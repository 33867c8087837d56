"""How a process that ran collectives ends. gloo's worker thread releases the last collective's tensors after the
caller has moved on, and that release takes the GIL; if it happens once interpreter teardown has begun, the process
aborts (exit -6, "terminate called without an active exception") after a run finished and wrote everything: 4 in 25
2-process TRM runs on a 2-core machine (0 in 50 through exit_now), and a failed CI run. dist.exit_now ends the process
before teardown; the command line leaves through it whenever this process started a process group. Both tests fail
when exit_now ends in sys.exit instead of os._exit."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

from conftest import ROOT

# one process in a gloo group. The last all_gather's handle is dropped at once, and the main thread keeps the GIL (a
# long switch interval, a busy wait, nothing written) until interpreter teardown, where an object's destructor lets
# other threads run, as torch's own destructors do. This forces the order CI hit by chance: gloo's thread gets the GIL
# to drop the collective's tensors only after finalizing began.
LATE_RELEASE = """
import os, sys, time
import torch, torch.distributed as td
from reasonlab import dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1")
td.init_process_group("gloo")
sys.setswitchinterval(100.0)

class LetsThreadsRunInTeardown:
    def __del__(self, sleep=time.sleep):
        sleep(0.5)

late = LetsThreadsRunInTeardown()
td.all_gather([torch.empty(4)], torch.ones(4), async_op=True)
t0 = time.perf_counter()
while time.perf_counter() - t0 < 0.5:
    pass
{ending}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_exit_now_ends_a_process_whose_collective_is_released_late_with_its_code():
    plain = _run(LATE_RELEASE.format(port=_free_port(), ending=""))
    # the control: an ordinary exit aborts here (if a torch release stops doing so, this test shows nothing)
    assert plain.returncode == -6 and "terminate called without an active exception" in plain.stderr, (
        plain.returncode, plain.stderr[-2000:])
    ours = _run(LATE_RELEASE.format(port=_free_port(), ending="dist.exit_now(3)"))
    assert ours.returncode == 3, (ours.returncode, ours.stderr[-2000:])
    assert "terminate called" not in ours.stderr
    # the atexit handlers ran before the exit, and what was still buffered on stdout came out


def test_the_command_line_leaves_through_exit_now_with_the_commands_code_after_a_process_group(tmp_path):
    """Bad input after the process group started: the one-line error and exit 2 survive the os._exit path, and the
    atexit handlers (here one that marks a file) ran; without a process group the ordinary SystemExit comes back."""
    mark = tmp_path / "atexit-ran"
    body = f"""
    import atexit, sys
    from reasonlab import cli, dist
    atexit.register(lambda: open({str(mark)!r}, "w").close())
    print("still buffered")  # stdout is a pipe: this waits in the buffer until a flush
    dist._STARTED = {{started}}
    sys.argv = ["reasonlab", "run", {str(tmp_path / "missing.yaml")!r}]
    try:
        cli.main()
    except SystemExit as e:
        print("SystemExit", e.code)
        raise
    """
    started = _run(body.format(started=True))
    assert started.returncode == 2, started.stderr[-2000:]
    assert started.stdout == "still buffered\n"  # flushed, and it did not come back through Python's exit
    assert len([line for line in started.stderr.splitlines() if line.strip()]) == 1
    assert "missing.yaml" in started.stderr
    assert mark.exists()
    mark.unlink()
    alone = _run(body.format(started=False))
    assert alone.returncode == 2 and "SystemExit 2" in alone.stdout
    assert mark.exists()
