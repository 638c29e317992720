"""The sandboxed grading kernel of the vitseg-lab course (copied into the course folder by
``python -m tools.grading build``; ``nbgrader_config.py`` sets ``Execute.kernel_manager_class`` to
``SandboxKernelManager``).

Every kernel nbgrader starts to grade a learner runs the learner's code, so it is started like this:

- **bwrap mode** (the default where it works: root + bubblewrap, installed by
  ``tools/sandbox_setup.sh``): a bubblewrap sandbox with new mount, PID, network, IPC and UTS
  namespaces. The file system inside is the operating system (read-only), the Python installation
  and its environment (read-only), the kernel's own assignment copy (read-write) and a private
  folder for the kernel's sockets; nothing else of the course exists there (no gradebook, no
  ``source/``, no other submission, no instructor library, no ``PYTHONPATH`` entry). The kernel
  runs as an unprivileged user (uid ``VITSEG_SANDBOX_UID``, default 61000, + the worker's slot),
  with no capabilities and ``no_new_privs``, and talks to nbgrader over Unix sockets (there is no
  network). When the kernel ends or is killed, the PID namespace ends with it: every process the
  learner started, detached or not, is killed.
- **limits-only mode** (fallback: no bubblewrap, not root, or ``VITSEG_SANDBOX=off``): the kernel
  runs as the grader's user with the resource limits below and its process group is killed at the
  end, but it can read whatever that user can read. This is **not** safe against a determined
  learner; nbgrader's log, ``tools.grading autograde`` and the course report say so loudly.
  ``VITSEG_SANDBOX=require`` makes the fallback an error instead.

Both modes set the same resource limits on the kernel (environment variables, defaults in
``LIMITS``): address space (``VITSEG_SANDBOX_MEM_MB``), processes and threads of the sandbox user
(``VITSEG_SANDBOX_NPROC``, bwrap mode only: it needs a user of its own), CPU seconds for the whole
notebook (``VITSEG_SANDBOX_CPU_S``), size of any file written (``VITSEG_SANDBOX_FSIZE_MB``), the
in-memory ``/tmp`` (``VITSEG_SANDBOX_TMP_MB``), open files, no core dumps. Output size is capped
in nbgrader's process (``vitseg_lab._grader.autograde.CapOutputs``).

This file is also the launcher: ``python vitseg_sandbox.py --mode M ... -- <kernel command>``
(what ``SandboxKernelManager.format_kernel_cmd`` returns). Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

ENV_MODE = "VITSEG_SANDBOX"                    # auto (default) | require | off
BASE_UID = int(os.environ.get("VITSEG_SANDBOX_UID", "61000"))
MB = 2**20


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def limits() -> dict[str, int]:
    """The resource limits of a grading kernel (read from the environment at each start)."""
    return {
        "mem_mb": _int_env("VITSEG_SANDBOX_MEM_MB", 6144),     # address space (RLIMIT_AS)
        "nproc": _int_env("VITSEG_SANDBOX_NPROC", 256),        # processes + threads of the user
        "cpu_s": _int_env("VITSEG_SANDBOX_CPU_S", 1800),       # CPU seconds, whole notebook
        "fsize_mb": _int_env("VITSEG_SANDBOX_FSIZE_MB", 256),  # largest file the kernel writes
        "tmp_mb": _int_env("VITSEG_SANDBOX_TMP_MB", 256),      # size of the sandbox's /tmp
        "nofile": _int_env("VITSEG_SANDBOX_NOFILE", 1024),     # open file descriptors
    }


LIMITS = limits()

# Environment passed into the sandbox (everything else, PYTHONPATH included, is dropped).
_KEEP_ENV = ("NBGRADER_EXECUTION", "LANG", "LC_ALL", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "OPENBLAS_NUM_THREADS", "MPLBACKEND", "TZ")
_KEEP_PREFIX = ("VITSEG_",)


# ================================================================================ mode detection

_probe_cache: dict[str, tuple[str, str]] = {}


def probe() -> tuple[str, str]:
    """(mode, why): ``"bwrap"`` when a sandbox can be started here, else ``"limits-only"``."""
    want = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    key = want
    if key in _probe_cache:
        return _probe_cache[key]
    if want == "off":
        res = ("limits-only", f"{ENV_MODE}=off")
    else:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            res = ("limits-only", "bubblewrap (bwrap) is not installed: run tools/sandbox_setup.sh")
        elif os.geteuid() != 0:
            res = ("limits-only", ("the grader does not run as root, so the kernel cannot be "
                                   "started as a separate unprivileged user"))
        else:
            trial = [bwrap, *_bwrap_base(), "--ro-bind", "/", "/", "--", "/bin/true"]
            try:
                p = subprocess.run(trial, capture_output=True, text=True, timeout=20, check=False)
                ok, err = p.returncode == 0, (p.stderr or "").strip()[:200]
            except (OSError, subprocess.TimeoutExpired) as e:
                ok, err = False, str(e)
            res = ("bwrap", "bubblewrap sandbox works") if ok else (
                "limits-only", f"bubblewrap cannot create namespaces here ({err})")
    if want == "require" and res[0] != "bwrap":
        raise RuntimeError(f"{ENV_MODE}=require but no sandbox: {res[1]}")
    _probe_cache[key] = res
    return res


def warning_text(mode: str, why: str) -> str:
    return ("VITSEG SANDBOX WARNING: grading kernels run WITHOUT a sandbox (limits-only mode: "
            f"{why}). Learner code can read and write whatever this user can (gradebook, "
            "source/, other submissions). Install bubblewrap (tools/sandbox_setup.sh) and grade "
            "as root, or set VITSEG_SANDBOX=require to refuse.") if mode != "bwrap" else ""


# ===================================================================================== launcher

def _bwrap_base() -> list[str]:
    return ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--hostname", "grader",
            "--proc", "/proc", "--dev", "/dev"]


def _python_roots() -> list[str]:
    """Read-only folders the kernel's Python needs: the installation and the environment."""
    roots = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        roots.add(os.path.realpath(p))
    roots.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    # an environment that lives inside the repository is bound on its own, not the repository
    return sorted(r for r in roots if r not in ("/", "/usr"))


def _system_binds() -> list[str]:
    args = []
    for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    etc = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "localtime",
           "ssl", "ca-certificates", "alternatives", "fonts", "mime.types", "os-release")
    for name in etc:
        p = os.path.join("/etc", name)
        if os.path.exists(p):
            args += ["--ro-bind", p, p]
    return args


def _set_limits(lim: dict[str, int], nproc: bool) -> None:
    import resource

    def cap(which: int, value: int) -> None:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
    cap(resource.RLIMIT_AS, lim["mem_mb"] * MB)
    cap(resource.RLIMIT_CPU, lim["cpu_s"])
    cap(resource.RLIMIT_FSIZE, lim["fsize_mb"] * MB)
    cap(resource.RLIMIT_NOFILE, lim["nofile"])
    cap(resource.RLIMIT_CORE, 0)
    if nproc:
        cap(resource.RLIMIT_NPROC, lim["nproc"])


def _chown_tree(path: str, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        os.lchown(dirpath, uid, gid)
        for n in dirnames + filenames:
            try:
                os.lchown(os.path.join(dirpath, n), uid, gid)
            except OSError:
                pass


def _drop_code(uid: int) -> str:
    """Python run inside the sandbox as root for an instant: become ``uid``, no caps, exec."""
    return ("import os,sys,ctypes;"
            "os.setgroups([]);"
            f"os.setresgid({uid},{uid},{uid});os.setresuid({uid},{uid},{uid});"
            "ctypes.CDLL(None,use_errno=True).prctl(38,1,0,0,0);"   # PR_SET_NO_NEW_PRIVS
            "import signal;signal.signal(signal.SIGINT,signal.SIG_DFL);"
            "os.execv(sys.argv[1],sys.argv[1:])")


def launch(mode: str, rundir: str, ro: list[str], slot: int, cmd: list[str]) -> None:
    """Replace this process by the kernel ``cmd``, sandboxed (never returns)."""
    lim = limits()
    work = os.getcwd()
    # SIGINT (interrupt on cell timeout) goes to the whole process group: the launcher and
    # bubblewrap must survive it, the kernel installs its own handler while it executes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    env_keep = {k: v for k, v in os.environ.items()
                if k in _KEEP_ENV or k.startswith(_KEEP_PREFIX)}
    if mode != "bwrap":
        env = dict(env_keep, PATH=os.environ.get("PATH", "/usr/bin:/bin"),
                   HOME=os.environ.get("HOME", "/tmp"))
        env.pop("PYTHONPATH", None)
        _set_limits(lim, nproc=False)
        signal.signal(signal.SIGINT, signal.SIG_DFL)    # no bubblewrap to protect: the kernel's
        os.execvpe(cmd[0], cmd, env)
    uid = BASE_UID + slot
    _chown_tree(work, uid, uid)
    _chown_tree(rundir, uid, uid)
    os.chmod(rundir, 0o700)
    py = sys.executable
    args = ["bwrap", *_bwrap_base(), "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
            "--cap-add", "CAP_SETGID", *_system_binds()]
    binds = [("--ro-bind", r) for r in _python_roots()]
    binds += [("--bind", work), ("--bind", rundir)]
    binds += [("--ro-bind", p) for p in ro if os.path.exists(p)]
    # /tmp first: a course under /tmp gets its folders on top of the sandbox's own /tmp
    args += ["--size", str(lim["tmp_mb"] * MB), "--perms", "1777", "--tmpfs", "/tmp",
             "--perms", "0777", "--dir", "/tmp/home"]
    made: set[str] = {"/", "/tmp", "/usr"}
    for _, dest in binds:            # parents of bind targets: bwrap would make them 0700
        parts = dest.strip("/").split("/")[:-1]
        for k in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:k])
            if d not in made:
                made.add(d)
                args += ["--perms", "0755", "--dir", d]
    venv_bin = os.path.dirname(os.path.abspath(py))
    for kind, dest in binds:
        args += [kind, dest, dest]
    args += ["--chdir", work, "--clearenv"]
    env = dict(env_keep, HOME="/tmp/home", MPLCONFIGDIR="/tmp/home/.mpl",
               PATH=f"{venv_bin}:/usr/local/bin:/usr/bin:/bin", VITSEG_SANDBOX_MODE="bwrap")
    for k, v in sorted(env.items()):
        args += ["--setenv", k, v]
    args += ["--", py, "-c", _drop_code(uid), *cmd]
    _set_limits(lim, nproc=True)
    os.execvp(args[0], args)


# ============================================================================ the kernel manager

try:
    from jupyter_client.manager import AsyncKernelManager as _KM
except Exception:  # noqa: BLE001 - the launcher runs without jupyter_client
    _KM = object  # type: ignore[assignment,misc]


class SandboxKernelManager(_KM):  # type: ignore[misc,valid-type]
    """nbgrader's kernel manager for autograding: starts every kernel through the launcher above,
    and kills the kernel's whole process group (in bwrap mode: its PID namespace) at shutdown."""

    _vitseg_rundir: str | None = None

    def _vitseg_mode(self) -> tuple[str, str]:
        mode, why = probe()
        if mode != "bwrap" and not getattr(SandboxKernelManager, "_warned", False):
            SandboxKernelManager._warned = True
            self.log.warning(warning_text(mode, why))
        return mode, why

    async def _async_pre_start_kernel(self, **kw):
        mode, _ = self._vitseg_mode()
        self._vitseg_rundir = tempfile.mkdtemp(prefix="vitseg-kernel-")
        if mode == "bwrap":
            self.transport = "ipc"
            self.connection_file = os.path.join(self._vitseg_rundir, "kernel.json")
            self.ip = os.path.join(self._vitseg_rundir, "ipc")
        return await super()._async_pre_start_kernel(**kw)

    def format_kernel_cmd(self, extra_arguments=None):
        cmd = super().format_kernel_cmd(extra_arguments)
        mode, _ = self._vitseg_mode()
        ro = []
        for a in cmd:                  # files the kernel is told to run (kernel_guard.py)
            if a.startswith("--IPKernelApp.exec_files="):
                ro += [p.strip(" []'\"") for p in a.split("=", 1)[1].split(",")]
        slot = int(os.environ.get("VITSEG_SANDBOX_SLOT", "0") or 0)
        launcher = [sys.executable, os.path.abspath(__file__), "--mode", mode,
                    "--rundir", self._vitseg_rundir or tempfile.mkdtemp(prefix="vitseg-kernel-"),
                    "--slot", str(slot)]
        for p in ro:
            launcher += ["--ro", p]
        return launcher + ["--", *cmd]

    async def _async_shutdown_kernel(self, now: bool = False, restart: bool = False):
        pgid = None
        if self.provisioner is not None and getattr(self.provisioner, "pgid", None):
            pgid = self.provisioner.pgid
        try:
            return await super()._async_shutdown_kernel(now=now, restart=restart)
        finally:
            if pgid:
                try:
                    os.killpg(pgid, signal.SIGKILL)     # whatever the kernel left behind
                except OSError:
                    pass
            if self._vitseg_rundir:
                shutil.rmtree(self._vitseg_rundir, ignore_errors=True)

    shutdown_kernel = _async_shutdown_kernel   # AsyncKernelManager's public name


def describe() -> dict:
    """The mode and limits grading kernels get on this machine (for the course report)."""
    mode, why = probe()
    return {"mode": mode, "why": why, "limits": limits(),
            "uid": BASE_UID if mode == "bwrap" else None, "warning": warning_text(mode, why)}


def _main(argv: list[str]) -> int:
    if "--" not in argv:
        print(json.dumps(describe(), indent=1))
        return 0
    opts, cmd = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    mode, rundir, slot, ro = "limits-only", tempfile.gettempdir(), 0, []
    i = 0
    while i < len(opts):
        k, v = opts[i], opts[i + 1]
        if k == "--mode":
            mode = v
        elif k == "--rundir":
            rundir = v
        elif k == "--slot":
            slot = int(v)
        elif k == "--ro":
            ro.append(v)
        i += 2
    launch(mode, rundir, ro, slot, cmd)
    return 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
