"""Runs a firewall script in the real bash, sandboxed, and records its ipchains commands.

The flat formats translate what the script *does* for the values given, so
the shell decides: ``if``/``case``/``&&``/loops/functions/``exit``/sourced
files all behave as bash makes them.  The script runs under bubblewrap with
no network, a read-only root, a private /tmp, /dev and /proc, no
capabilities, its own session and a time limit.  Recording stand-ins
(shell functions, defined through BASH_ENV before the script starts)
replace ipchains, ipchains-restore and ipmasqadm by name, by absolute path
(/sbin/ipchains, and so through $IPCHAINS) and for ``[ -x /sbin/ipchains ]``
tests; modprobe and insmod are recorded too; ifconfig, route, ip, sleep and
friends do nothing.  Each record carries the FILE:LINE of the command that
called the stand-in (BASH_SOURCE/BASH_LINENO).

``run(name, text, positional, forced, timeout)`` returns a Run: the records
in execution order and how the script ended.  Sandbox.error carries why the
sandbox could not run at all.
"""
import fcntl
import glob
import os
import re
import selectors
import stat
import struct
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import List

TIMEOUT = 60
PROCESSES = 512             # processes (and threads) the sandbox may hold at once
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MAX_RECORDS = 64 << 20      # bytes of records kept: 100,000 rules take about 8 MiB
MEMORY = 1 << 30            # address space of each process in the sandbox
TMPFS = 64 << 20            # size of each writable place (/tmp, /run, /var/tmp)
STDERR_TAIL = 2000          # characters of the script's stderr kept for messages
MAX_SOURCE = 16 << 20       # bytes of a sourced file read back to cite its lines
# Places the sandbox has its own of: a file there on the host is not the one bash ran.
PRIVATE = ("/tmp", "/run", "/var/tmp", "/dev", "/proc", "/sys")
INSIDE = "/tmp/ipchains-translate"
# What root may read and no firewall script needs: hidden, as what the script
# reads can reach the output through a value or a message.
SECRET_DIRS = ("/root", "/home", "/etc/ssl/private", "/etc/sudoers.d")
SECRET_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
                "/etc/ssh/ssh_host_*key")
# Other firewall tools: what the script loads with them is not in the translation.
FOREIGN = ("iptables", "iptables-restore", "ip6tables", "ipfwadm", "nft")
RECORDED = ("ipchains", "ipchains-restore", "ipmasqadm", "modprobe", "insmod") + FOREIGN
SILENT = ("ifconfig", "route", "ip", "sleep", "depmod", "rmmod", "lsmod", "logger",
          "ipchains-save", "ifup", "ifdown", "tc", "arp", "hostname")
BIN_DIRS = ("/sbin", "/usr/sbin", "/usr/local/sbin", "/bin", "/usr/bin", "/usr/local/bin",
            "/usr/local/ipchains")
PATH_WORD = re.compile(r"(?:/[\w.+-]+)+/(?:%s)\b" % "|".join(
    re.escape(p) for p in RECORDED + SILENT))
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Executable stand-ins, first on PATH, for the programs that run ipchains
# where bash's functions do not reach (env, xargs, nice, exec, sh scripts).
BIN = INSIDE + "/in/bin"
UNSEEN = "unseen"
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
LOST = "ipchains-translate:lost-record"


class SandboxError(Exception):
    """The sandbox cannot run here (no bwrap, no namespaces, timeout)."""


@dataclass
class Record:
    """One stand-in call: kind (program), file and line of the call, argv after it.

    For ipchains-restore, ``data`` is its standard input and ``data_file``
    the file it came from (when it was a regular file).
    """

    kind: str
    file: str
    line: int
    argv: List[str]
    data: str = ""
    data_file: str = ""


@dataclass
class Run:
    """What bash did: the records in order, its exit status, stderr's tail."""

    records: List[Record] = field(default_factory=list)
    status: int = 0
    stderr: str = ""


def quote(text):
    """Return TEXT single-quoted for bash."""
    return "'%s'" % text.replace("'", "'\\''")


def standins(text):
    """Return the BASH_ENV file defining the stand-ins (and paths named in TEXT)."""
    paths = set(PATH_WORD.findall(text)) | {"%s/%s" % (BIN, p) for p in RECORDED}
    for d in BIN_DIRS:
        for prog in RECORDED + SILENT:
            paths.add("%s/%s" % (d, prog))
    lines = [
        # Records go to bash's standard output (a pipe to the translator);
        # the script's own output goes nowhere.  No host path is writable.
        # A bash the script starts (bash rules.sh) reads this file too and
        # records on the same pipe, found through __XL_FD.
        "if builtin [ -z \"$__XL_FD\" ]; then exec {__xl_fd}>&1 >/dev/null; "
        "export __XL_FD=$__xl_fd; else __xl_fd=$__XL_FD; fi",
        # A record that cannot be written (the script closed the channel)
        # ends the sandbox: the commands after it would be lost unseen.
        "__xl_lost() { builtin echo %s >&2; builtin kill -9 -1; builtin kill -9 $BASHPID; }"
        % LOST,
        # FUNCNAME: [__xl_rec, stand-in, caller...]: the caller's file and line.
        "__xl_rec() { local kind=$1; shift; printf '%s\\0%s\\0%s\\0%s\\0' \"$kind\" "
        "\"${BASH_SOURCE[2]}\" \"${BASH_LINENO[1]}\" \"$#\" >&$__xl_fd || __xl_lost; "
        "builtin [ $# -eq 0 ] || printf '%s\\0' \"$@\" >&$__xl_fd || __xl_lost; return 0; }",
        "__xl_restore() { local from data; from=$(readlink /proc/self/fd/0 2>/dev/null); "
        "builtin [ -f \"$from\" ] || from=; data=$(cat); "
        "printf '%s\\0%s\\0%s\\0%s\\0%s\\0%s\\0' restore \"${BASH_SOURCE[2]}\" "
        "\"${BASH_LINENO[1]}\" 2 \"$from\" \"$data\" >&$__xl_fd || __xl_lost; return 0; }",
        # [ -x /sbin/ipchains ] and test -f .../ipmasqadm are true, as on the
        # host the script was written for.
        "__xl_ours() { case \"$1\" in */ipchains|*/ipchains-restore|*/ipmasqadm|ipchains|"
        "ipmasqadm|ipchains-restore) return 0;; esac; return 1; }",
        "__xl_test() { if builtin [ $# -eq 3 ] && builtin [ \"$1\" = '!' ]; then "
        "shift; ! __xl_test \"$@\"; return; fi; "
        "if builtin [ $# -eq 2 ] && __xl_ours \"$2\"; then case \"$1\" in "
        "-x|-f|-e|-s|-r) return 0;; esac; fi; builtin test \"$@\"; }",
        "test() { __xl_test \"$@\"; }",
        "[() { builtin [ \"${!#}\" = ']' ] || { builtin [ \"$@\"; return; }; "
        "__xl_test \"${@:1:$#-1}\"; }",
    ]
    for name in sorted(paths) + list(RECORDED + SILENT):
        prog = name.rsplit("/", 1)[-1]
        if prog == "ipchains-restore":
            body = "__xl_restore \"$@\""
        elif prog in RECORDED:
            # One printf per command (a big firewall makes 100,000 calls):
            # kind, the caller's file and line, argc, argv.
            body = ("printf '%%s\\0' %s \"${BASH_SOURCE[1]}\" \"${BASH_LINENO[0]}\" "
                    "$# \"$@\" >&$__xl_fd || __xl_lost; return 0" % prog)
        else:
            body = "return 0"
        lines.append("%s() { %s; }" % (name, body))
    return "\n".join(lines) + "\n"


def unseen_program(prog):
    """Return the executable stand-in for PROG: run by a program, not by bash's
    function, it records that the script's line of it cannot be known."""
    return ("#!/bin/bash\nprintf '%%s\\0' %s '' 0 $(($# + 1)) %s \"$@\" >&${__XL_FD:-1}\n"
            "exit 0\n" % (UNSEEN, prog))


def write_inside(tmp, text, forced):
    """Write the files the sandbox sees under INSIDE/in: stand-ins, forced values, programs."""
    with open(os.path.join(tmp, "in", "standins"), "w") as f:
        f.write(standins(text) + forcing(forced or {}))
    os.mkdir(os.path.join(tmp, "in", "bin"))
    for prog in RECORDED[:3]:          # ipchains, ipchains-restore, ipmasqadm
        path = os.path.join(tmp, "in", "bin", prog)
        with open(path, "w") as f:
            f.write(unseen_program(prog))
        os.chmod(path, 0o755)


def forcing(forced):
    """Return the lines making FORCED {NAME: VALUE} win over the script's assignments.

    bash runs the DEBUG trap before it expands each simple command (and in
    functions and subshells, with functrace), so the value is back in
    place whenever a command reads it.
    """
    if not forced:
        return ""
    sets = "; ".join("%s=%s" % (k, quote(v)) for k, v in sorted(forced.items()))
    return ("__xl_force() { %s; }\n%s\nset -o functrace\ntrap __xl_force DEBUG\n"
            % (sets, sets))


def bwrap_argv(tmp, timeout):
    """Return the command running bash in the sandbox (files prepared in TMP)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError("the flat formats run the script in a sandbox and need "
                           "bwrap (Debian package bubblewrap); --to=iptables does not")
    size = str(TMPFS)
    # /dev is read-only (its nodes still work): a tmpfs without a size
    # would let the script fill the host's memory.
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--remount-ro", "/dev",
            "--proc", "/proc", "--size", size, "--tmpfs", "/tmp", "--size", size,
            "--tmpfs", "/run", "--size", size, "--tmpfs", "/var/tmp"] + hiding() + [
            "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--chdir", os.getcwd(), "--clearenv",
            "--setenv", "PATH", BIN + ":/usr/sbin:/usr/bin:/sbin:/bin",
            "--setenv", "BASH_ENV", INSIDE + "/in/standins",
            "--setenv", "HOME", "/tmp", "--setenv", "LC_ALL", "C.UTF-8",
            "--", "prlimit", "--as=%d" % MEMORY, "--core=0", "--",
            "timeout", "-k", "2", str(timeout), "/bin/bash"]


# bash's (and dash's) words when fork() fails: with the process bound, a
# script hitting it (a fork bomb) is stopped at once rather than at TIMEOUT.
FORK_FAILED = re.compile(rb"fork: (?:retry: )?Resource temporarily unavailable|Cannot fork")
NO_BOUND = "ipchains-translate:no-process-bound"


class ProcessLimit(Exception):
    """The script hit the sandbox's process bound."""


def pid_max_per_namespace(release=None):
    """True when this kernel keeps kernel.pid_max per pid namespace (Linux >= 6.14)."""
    release = release or os.uname().release
    numbers = re.match(r"(\d+)\.(\d+)", release)
    return numbers is not None and (int(numbers.group(1)), int(numbers.group(2))) >= (6, 14)


def process_bound():
    """Return the command words that run the sandbox with at most PROCESSES
    processes, or [] where this cannot be done.

    RLIMIT_NPROC does nothing for uid 0 (the script runs as root without
    capabilities, so that it reads what root can), and a cgroup would mean
    changing the host's.  Instead the sandbox runs in a pid namespace of its
    own whose pid_max (per namespace since Linux 6.14) is PROCESSES: every
    process of the sandbox, in bwrap's namespace below it too, takes a pid
    there.  The shell that sets it checks that it is that namespace's
    pid 1, and the kernel check keeps an older kernel's global pid_max from
    being written; `unshare --kill-child` ends the namespace with it.
    """
    unshare = shutil.which("unshare")
    if unshare is None or not pid_max_per_namespace():
        return []
    return [unshare, "--pid", "--fork", "--kill-child", "--", "/bin/bash", "--norc",
            "--noprofile", "-c", PID1 % (PROCESSES, NO_BOUND), "bash"]


# Pid 1 of the sandbox's namespace: bounds it, runs bwrap ("$@"), and reaps
# what bwrap leaves: bwrap does not wait for the init of its own namespace
# below, which dies with it (--die-with-parent) and is orphaned to this
# process.  Reaped here, its CPU time (the script's) is counted upwards;
# left to the namespace's end, the kernel would drop it.
PID1 = ('[ "$$" = 1 ] && echo %d > /proc/sys/kernel/pid_max || { echo %s >&2; exit 125; }; '
        '"$@" & wait $!; status=$?; '
        'for _ in {1..1000}; do read -r kids < /proc/thread-self/children; '
        '[ -z "$kids" ] && break; done; exit $status')


def hiding():
    """Return the bwrap options hiding the SECRET_DIRS and SECRET_FILES that exist here
    (the script's and the working directory are bound again after them)."""
    out = []
    for path in SECRET_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            out += ["--size", "65536", "--tmpfs", path]
    for pattern in SECRET_FILES:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path) and not os.path.islink(path):
                out += ["--ro-bind", "/dev/null", path]
    return out


def shown(path):
    """Return the bwrap options showing, read-only, the working directory and the
    directory of script PATH where the root's view lacks them.

    A directory that is or holds a place the sandbox has its own of (/, /tmp,
    /var, /run...) is not bound: that would show the host's /tmp and /run
    (where root's tmux, Docker's and systemd's sockets live) and hide the
    stand-ins; a script directly in such a place is bound alone.
    """
    def below(path, top):
        return path == top or path.startswith(top.rstrip("/") + "/")

    def bindable(d):
        return not any(below(p, d) for p in PRIVATE) and \
            not any(below(d, p) for p in ("/dev", "/proc", "/sys"))
    out = ["--ro-bind", os.getcwd(), os.getcwd()] if bindable(os.getcwd()) else []
    if not path.startswith(INSIDE + "/"):
        here = os.path.dirname(path)
        if bindable(here):
            out += ["--ro-bind", here, here]
        elif any(below(here, p) for p in PRIVATE):
            out += ["--ro-bind", path, path]
    return out


# Classic BPF for seccomp: the native architecture's socket(AF_UNIX, ...)
# fails with EACCES and io_uring (which opens sockets too) with ENOSYS; any
# other architecture's calls (x32, i386 on x86-64) fail with ENOSYS.
SECCOMP_ARCHES = {
    # machine: (AUDIT_ARCH_*, socket, io_uring_setup, lowest foreign syscall number)
    "x86_64": (0xc000003e, 41, 425, 0x40000000),
    "aarch64": (0xc00000b7, 198, 425, None),
}


def seccomp_program(machine):
    """Return the seccomp filter for MACHINE (uname -m) as bytes, or None if unknown."""
    if machine not in SECCOMP_ARCHES:
        return None
    arch, socket_nr, uring_nr, foreign = SECCOMP_ARCHES[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, errno = 0x7fff0000, 0x00050000
    eacces, enosys, af_unix = 13, 38, 1
    prog = [
        (ld, 0, 0, 4),                      # arch
        (jeq, 1, 0, arch),
        (ret, 0, 0, errno | enosys),
        (ld, 0, 0, 0),                      # syscall number
        (jge, 0, 1, foreign if foreign is not None else 0xffffffff),
        (ret, 0, 0, errno | enosys),
        (jeq, 0, 1, uring_nr),
        (ret, 0, 0, errno | enosys),
        (jeq, 0, 3, socket_nr),
        (ld, 0, 0, 16),                     # socket's domain (low half of args[0])
        (jeq, 0, 1, af_unix),
        (ret, 0, 0, errno | eacces),
        (ret, 0, 0, allow),
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def seccomp_fd(tmp):
    """Return a readable descriptor of the seccomp filter (file in TMP), or None."""
    program = seccomp_program(os.uname().machine)
    if program is None:
        return None
    path = os.path.join(tmp, "seccomp")
    with open(path, "wb") as f:
        f.write(program)
    return os.open(path, os.O_RDONLY)


def run(name, text, positional=(), forced=None, timeout=None, sink=None):
    """Run script TEXT (called NAME) in the sandbox; return the Run (SandboxError if it cannot).

    A NAME that is a file runs from where it is (its directory is visible,
    read-only, so it can source its neighbours and read its $0); any other
    (stdin) runs from a private copy.  With SINK, the records are not kept
    in the Run but given to SINK (a list of Records at a time, in order)
    while bash still runs, so the caller's work on them overlaps bash's;
    a SandboxError after that means SINK's work is to be thrown away.
    """
    timeout = timeout or TIMEOUT
    with tempfile.TemporaryDirectory(prefix="ipchains-translate.") as tmp:
        os.mkdir(os.path.join(tmp, "in"))
        script = os.path.join(tmp, "in", "script")
        with open(script, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        write_inside(tmp, text, forced)
        path, names = INSIDE + "/in/script", {INSIDE + "/in/script": name}
        if os.path.isfile(name):
            path = os.path.abspath(name)
            names = {path: name}
        # The stand-ins are bound last: nothing the user's directories show covers them.
        binds = shown(path) + ["--ro-bind", os.path.join(tmp, "in"), INSIDE + "/in"]
        base = bwrap_argv(tmp, timeout)
        cut = base.index("--unshare-all")
        filter_fd = seccomp_fd(tmp)
        if filter_fd is not None:
            binds += ["--seccomp", str(filter_fd)]
        bound = process_bound()
        argv = bound + base[:cut] + binds + base[cut:] + [path] + list(positional)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env={"PATH": SAFE_PATH},
                                    pass_fds=() if filter_fd is None else (filter_fd,))
        except OSError as exc:
            raise SandboxError("cannot run the sandbox: %s" % exc)
        finally:
            if filter_fd is not None:
                os.close(filter_fd)
        kept = []
        stream = RecordStream(names, sink or kept.extend)
        with proc:
            try:
                head, tail = collect(proc, timeout + 10, stream.feed, bool(bound))
            except subprocess.TimeoutExpired:
                raise SandboxError("%s: the script ran longer than %d s in the sandbox"
                                   % (name, timeout))
            except OverflowError:
                raise SandboxError("%s: the script recorded more than %d MiB of commands in "
                                   "the sandbox" % (name, MAX_RECORDS >> 20))
            except ProcessLimit:
                raise SandboxError("%s: the script ran more than %d processes at once in the "
                                   "sandbox (a fork bomb?); stopped, nothing translated"
                                   % (name, PROCESSES))
            finally:
                stop(proc)
        stderr = tail.decode("utf-8", "replace")
        if head.startswith(NO_BOUND.encode()):
            raise SandboxError("cannot run the sandbox: its process bound (pid_max of its "
                               "own pid namespace) could not be set")
        if LOST.encode() in tail:
            raise SandboxError("%s: the script closed the stand-ins' record channel (a "
                               "descriptor above 2); nothing translated" % name)
        if proc.returncode in (124, 137):
            raise SandboxError("%s: the script ran longer than %d s in the sandbox"
                               % (name, timeout))
        if head.startswith(b"bwrap:"):
            raise SandboxError("cannot run the sandbox: %s"
                               % head.decode("utf-8", "replace").strip().split("\n")[0])
        if b"cannot allocate" in tail or b"Cannot allocate" in tail:
            raise SandboxError("%s: the script ran out of memory in the sandbox (%d MiB)"
                               % (name, MEMORY >> 20))
    stream.end()
    return Run(kept, proc.returncode, stderr[-STDERR_TAIL:])


PIPE_SIZE = 1 << 20     # the record pipe's capacity: bash runs ahead while we parse


def collect(proc, seconds, feed, bounded=False):
    """Give PROC's stdout to FEED as it comes and read its stderr, until both close;
    return (stderr's head, tail).

    At most MAX_RECORDS bytes of stdout are read (OverflowError past it), and
    only the ends of stderr are kept, however much the script writes; the
    pipe itself holds at most PIPE_SIZE.  TimeoutExpired after SECONDS;
    ProcessLimit when BOUNDED (process_bound) and a fork failed.
    The caller stops PROC.
    """
    size, head, tail = 0, b"", b""
    deadline = time.monotonic() + seconds
    try:
        fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass                    # a smaller pipe only means more wake-ups
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, seconds)
            for key, _ in sel.select(left):
                chunk = os.read(key.fileobj.fileno(), PIPE_SIZE)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "out":
                    size += len(chunk)
                    if size > MAX_RECORDS:
                        raise OverflowError
                    feed(chunk)
                else:
                    if bounded and FORK_FAILED.search(tail[-64:] + chunk):
                        raise ProcessLimit
                    head = head or chunk[:STDERR_TAIL]
                    tail = (tail + chunk)[-4 * STDERR_TAIL:]
    proc.wait(max(0.0, deadline - time.monotonic()))
    return head, tail


def stop(proc):
    """Kill PROC (bwrap) if it still runs and reap it: its sandbox dies with it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class RecordStream:
    """Parses the NUL-separated records (kind, file, line, argc, argv...) as they
    arrive and gives each complete run of them to SINK; file names mapped by NAMES.

    Malformed data (the script wrote into the record channel) stops the
    parsing; end() raises it, and raises for a record left incomplete.
    """

    def __init__(self, names, sink):
        self.names = names
        self.sink = sink
        self.rest = bytearray()     # bytes after the last NUL seen
        self.fields = []            # whole fields not yet a whole record
        self.bad = False

    def feed(self, chunk):
        """Take the next CHUNK of the stream."""
        if self.bad:
            return
        cut = chunk.rfind(b"\0")
        if cut < 0:
            self.rest += chunk
            return
        data = bytes(self.rest) + chunk[:cut] if self.rest else chunk[:cut]
        self.rest = bytearray(chunk[cut + 1:])
        fields = self.fields
        fields.extend(data.decode("utf-8", "surrogateescape").split("\0"))
        records, i, n = [], 0, len(fields)
        names, kind_restore = self.names, "restore"
        while i + 4 <= n:
            kind, file, line, argc = fields[i:i + 4]
            if not is_count(argc) or (line and not is_count(line)):
                self.bad = True
                break
            end = i + 4 + int(argc)
            if end > n:
                break
            args = fields[i + 4:end]
            i = end
            file = names.get(file, file)
            if kind == kind_restore:
                if len(args) != 2:
                    self.bad = True
                    break
                records.append(Record(kind, file, int(line or 0), [], data=args[1],
                                      data_file=args[0]))
            else:
                records.append(Record(kind, file, int(line or 0), args))
        del fields[:i]
        if records:
            self.sink(records)

    def end(self):
        """Check that the stream ended with a whole record (SandboxError if not)."""
        if self.bad or self.rest or self.fields:
            raise SandboxError("%s: the script wrote into the stand-ins' record stream; "
                               "nothing translated" % ", ".join(self.names.values()))


def is_count(field):
    """Return True when record FIELD is a count bash can write: ASCII digits, at most 10 of them.

    bash's line numbers and argc are C ints; more digits are forged (and int()
    refuses 4,300 and more).
    """
    return 0 < len(field) <= 10 and field.isascii() and field.isdigit()


def split_positional(defines):
    """Split -D values: digits are positional parameters ($1..), the rest forced variables."""
    positional, forced = {}, {}
    for key, value in defines.items():
        if key.isdigit() and key != "0":
            positional[int(key)] = value
        elif NAME.match(key):
            forced[key] = value
    args = [positional.get(i, "") for i in range(1, max(positional, default=0) + 1)]
    return args, forced


# ---------------------------------------------------------------- records -> items


class Origins:
    """Maps a line bash reports to its command's first line and text, per file."""

    def __init__(self, texts, shown=()):
        self.texts = dict(texts)       # file -> text (read from disk when missing)
        self.shown = shown             # directories bound into the sandbox as they are
        self.spans = {}
        self.read = []                 # texts of the files read, in the order read

    def texts_read(self):
        """Return the texts of the files given or read so far."""
        return list(self.texts.values()) + self.read

    def span(self, file, line):
        """Return (first line, text of the command) around LINE of FILE."""
        if file not in self.spans:
            self.spans[file] = self._read(file)
        lines, starts = self.spans[file]
        first = starts.get(line, line)
        last = first
        while last < len(lines) and lines[last - 1].endswith("\\"):
            last += 1
        text = "\n".join(lines[first - 1:last]) if 0 < first <= len(lines) else ""
        return first, text.strip()

    def absent(self, file, line):
        """Say why LINE of FILE has no text to cite (span gave ''): a record bash did not write, or an eval's."""
        lines, _ = self.spans[file]
        if lines == [""]:
            return "%s is empty or was not read" % file
        return "%s has no line %d: it has %d lines" % (file, line, len(lines) - (lines[-1] == ""))

    def _read(self, file):
        """Return (lines, {continued line: first line}) of FILE.

        bash reports a command continued with backslashes at its first line
        or a later one; quoted newlines inside ipchains arguments do not
        occur in firewall scripts, so backslashes are all that is followed.
        """
        text = self.texts.get(file)
        if text is None:
            text = read_as_seen(file, self.shown)
        self.read.append(text)
        lines = text.split("\n")
        starts = {}
        for n in range(2, len(lines) + 1):
            if n not in starts and lines[n - 2].endswith("\\"):
                starts[n] = starts.get(n - 1, n - 1)
        return lines, starts


def read_as_seen(path, shown):
    """Return the text of file PATH as bash in the sandbox saw it, or '' when unsure.

    The name comes from the script (bash's BASH_SOURCE, or a record it
    forged), so only a regular file of at most MAX_SOURCE bytes is read, and
    not one in a place the sandbox had its own of (PRIVATE) unless it lies
    below a directory in SHOWN: the host's /proc/self/environ, a FIFO, a
    device or a file of the host's /tmp are none of the script's business.
    """
    real = os.path.realpath(path)

    def below(top):
        top = os.path.realpath(top)
        return real == top or real.startswith(top.rstrip("/") + "/")
    if any(below(p) for p in PRIVATE) and not any(below(d) for d in shown):
        return ""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SOURCE:
            return ""
        return f.read(MAX_SOURCE).decode("utf-8", "surrogateescape")
