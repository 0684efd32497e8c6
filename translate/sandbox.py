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
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import List

TIMEOUT = 60
INSIDE = "/tmp/ipchains-translate"
RECORDED = ("ipchains", "ipchains-restore", "ipmasqadm", "modprobe", "insmod")
SILENT = ("ifconfig", "route", "ip", "sleep", "depmod", "rmmod", "lsmod", "logger",
          "ipchains-save", "ipfwadm", "ifup", "ifdown", "iptables", "tc", "arp", "hostname")
BIN_DIRS = ("/sbin", "/usr/sbin", "/usr/local/sbin", "/bin", "/usr/bin", "/usr/local/bin",
            "/usr/local/ipchains")
PATH_WORD = re.compile(r"(?:/[\w.+-]+)+/(?:%s)\b" % "|".join(
    re.escape(p) for p in RECORDED + SILENT))
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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
    paths = set(PATH_WORD.findall(text))
    for d in BIN_DIRS:
        for prog in RECORDED + SILENT:
            paths.add("%s/%s" % (d, prog))
    lines = [
        # Records go to bash's standard output (a pipe to the translator);
        # the script's own output goes nowhere.  No host path is writable.
        "exec {__xl_fd}>&1 >/dev/null",
        # FUNCNAME: [__xl_rec, stand-in, caller...]: the caller's file and line.
        "__xl_rec() { local kind=$1; shift; printf '%s\\0%s\\0%s\\0%s\\0' \"$kind\" "
        "\"${BASH_SOURCE[2]}\" \"${BASH_LINENO[1]}\" \"$#\" >&$__xl_fd; "
        "builtin [ $# -eq 0 ] || printf '%s\\0' \"$@\" >&$__xl_fd; return 0; }",
        "__xl_restore() { local from data; from=$(readlink /proc/self/fd/0 2>/dev/null); "
        "builtin [ -f \"$from\" ] || from=; data=$(cat); "
        "printf '%s\\0%s\\0%s\\0%s\\0%s\\0%s\\0' restore \"${BASH_SOURCE[2]}\" "
        "\"${BASH_LINENO[1]}\" 2 \"$from\" \"$data\" >&$__xl_fd; return 0; }",
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
                    "$# \"$@\" >&$__xl_fd; return 0" % prog)
        else:
            body = "return 0"
        lines.append("%s() { %s; }" % (name, body))
    return "\n".join(lines) + "\n"


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
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--tmpfs", "/run", "--tmpfs", "/var/tmp",
            "--ro-bind", os.path.join(tmp, "in"), INSIDE + "/in",
            "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--chdir", os.getcwd(), "--clearenv",
            "--setenv", "PATH", "/usr/sbin:/usr/bin:/sbin:/bin",
            "--setenv", "BASH_ENV", INSIDE + "/in/standins",
            "--setenv", "HOME", "/tmp", "--setenv", "LC_ALL", "C.UTF-8",
            "--", "timeout", "-k", "2", str(timeout), "/bin/bash"]


def run(name, text, positional=(), forced=None, timeout=None):
    """Run script TEXT (called NAME) in the sandbox; return the Run (SandboxError if it cannot).

    A NAME that is a file runs from where it is (its directory is visible,
    read-only, so it can source its neighbours and read its $0); any other
    (stdin) runs from a private copy.
    """
    timeout = timeout or TIMEOUT
    with tempfile.TemporaryDirectory(prefix="ipchains-translate.") as tmp:
        os.mkdir(os.path.join(tmp, "in"))
        script = os.path.join(tmp, "in", "script")
        with open(script, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        with open(os.path.join(tmp, "in", "standins"), "w") as f:
            f.write(standins(text) + forcing(forced or {}))
        path, names = INSIDE + "/in/script", {INSIDE + "/in/script": name}
        # The working directory (relative paths in the script) is seen read-only.
        binds = ["--ro-bind", os.getcwd(), os.getcwd()]
        if os.path.isfile(name):
            path = os.path.abspath(name)
            names = {path: name}
            binds += ["--ro-bind", os.path.dirname(path), os.path.dirname(path)]
        base = bwrap_argv(tmp, timeout)
        cut = base.index("--unshare-all")
        argv = base[:cut] + binds + base[cut:] + [path] + list(positional)
        try:
            # Records go to a file read once bash is done: through a pipe the
            # translator would wake for every record (100,000 in a big script).
            with tempfile.TemporaryFile(dir=tmp) as out:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.PIPE, timeout=timeout + 10)
                out.seek(0)
                data = out.read()
        except subprocess.TimeoutExpired:
            raise SandboxError("%s: the script ran longer than %d s in the sandbox"
                               % (name, timeout))
        except OSError as exc:
            raise SandboxError("cannot run the sandbox: %s" % exc)
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode in (124, 137):
            raise SandboxError("%s: the script ran longer than %d s in the sandbox"
                               % (name, timeout))
        if stderr.startswith("bwrap:"):
            raise SandboxError("cannot run the sandbox: %s" % stderr.strip().split("\n")[0])
    records = parse_records(data, names)
    return Run(records, proc.returncode, stderr[-2000:])


def parse_records(data, names):
    """Return the Records of the NUL-separated DATA; file names mapped by NAMES."""
    fields = data.decode("utf-8", "surrogateescape").split("\0")
    out, i = [], 0
    last = len(fields) - 1          # the data ends with NUL: fields[last] == ''
    for _ in range(len(fields)):
        if i >= last:
            break
        kind, file, line, argc = (fields[i:i + 4] + ["", "", "", ""])[:4]
        if i + 4 > last or not argc.isdigit() or (line and not line.isdigit()) or \
                i + 4 + int(argc) > last:
            raise SandboxError("%s: the script wrote into the stand-ins' record stream; "
                               "nothing translated" % ", ".join(names.values()))
        n = int(argc)
        args = fields[i + 4:i + 4 + n]
        i += 4 + n
        file = names.get(file, file)
        if kind == "restore":
            out.append(Record(kind, file, int(line or 0), [], data=args[1],
                              data_file=args[0]))
        else:
            out.append(Record(kind, file, int(line or 0), args))
    return out


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

    def __init__(self, texts):
        self.texts = dict(texts)       # file -> text (read from disk when missing)
        self.spans = {}

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

    def _read(self, file):
        """Return (lines, {continued line: first line}) of FILE.

        bash reports a command continued with backslashes at its first line
        or a later one; quoted newlines inside ipchains arguments do not
        occur in firewall scripts, so backslashes are all that is followed.
        """
        text = self.texts.get(file)
        if text is None:
            try:
                with open(file, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
            except OSError:
                text = ""
        lines = text.split("\n")
        starts = {}
        for n in range(2, len(lines) + 1):
            if n not in starts and lines[n - 2].endswith("\\"):
                starts[n] = starts.get(n - 1, n - 1)
        return lines, starts
