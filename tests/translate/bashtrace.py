"""The lines of a script that bash really runs, computed apart from the translator.

The script runs in the real bash with ``set -x`` and PS4 naming FILE:LINE,
in a private mount and network namespace where /usr/sbin is an overlay
holding do-nothing executables for ipchains, ipchains-restore, ipmasqadm,
modprobe, insmod and depmod (so ``[ -x /sbin/ipchains ]`` holds, nothing is
loaded and the host's network is out of reach).  -D NAME=VALUE becomes a
read-only variable, so the script's own assignments cannot change it.
"""
import os
import re
import shlex
import subprocess
import tempfile

PROGRAMS = ("ipchains", "ipchains-restore", "ipmasqadm")
STANDINS = {"ipchains": "exit 0", "ipmasqadm": "exit 0", "ipchains-restore": "cat >/dev/null",
            "modprobe": "exit 0", "insmod": "exit 0", "depmod": "exit 0"}
TRACE = re.compile(r"^\++(?P<file>[^:\n]*):(?P<line>\d+): (?P<cmd>.*)$", re.M)


def first_line(lines, number):
    """Return the first line of the command that physical line NUMBER belongs to."""
    while number > 1 and lines[number - 2].endswith("\\"):
        number -= 1
    return number


def split_args(args):
    """Return (positional parameters, {NAME: VALUE}) of a case's -D arguments."""
    positional, named = {}, {}
    for i, word in enumerate(args):
        if word == "-D":
            name, _, value = args[i + 1].partition("=")
            if name.isdigit():
                positional[int(name)] = value
            else:
                named[name] = value
    return [positional.get(i, "") for i in range(1, max(positional, default=0) + 1)], named


def run_lines(directory, script, args):
    """Return {'FILE:LINE'} of the ipchains/ipmasqadm commands (and ipchains-restore
    input lines, and modprobe ip_masq_*) bash runs for SCRIPT in DIRECTORY."""
    positional, named = split_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        standins = os.path.join(tmp, "standins")
        os.mkdir(standins)
        for name, body in STANDINS.items():
            path = os.path.join(standins, name)
            with open(path, "w") as f:
                f.write("#!/bin/sh\n%s\n" % body)
            os.chmod(path, 0o755)
        # The overlay's upper layer lives on a tmpfs of the private mount
        # namespace (an upper layer on overlayfs, as in containers, is refused).
        layer = os.path.join(tmp, "layer")
        os.mkdir(layer)
        upper, work = os.path.join(layer, "upper"), os.path.join(layer, "work")
        pre = "".join("readonly %s=%s; " % (k, shlex.quote(v)) for k, v in named.items())
        inner = ("mount -t tmpfs tmpfs %s && mkdir %s %s && cp -p %s/* %s && "
                 "mount -t overlay overlay -o lowerdir=/usr/sbin,upperdir=%s,workdir=%s "
                 "/usr/sbin && cd %s && exec bash -c %s %s %s 2>&1 >/dev/null </dev/null"
                 % (layer, upper, work, standins, upper, upper, work, shlex.quote(directory),
                    # bash run as root ignores PS4 from the environment.
                    shlex.quote("PS4='+${BASH_SOURCE}:${LINENO}: '; " + pre +
                                'set -x; . "$0" "$@"'), shlex.quote(script),
                    " ".join(shlex.quote(p) for p in positional)))
        proc = subprocess.run(["unshare", "--mount", "--net", "--fork", "sh", "-c", inner],
                              capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and not TRACE.search(proc.stdout):
        raise RuntimeError("bashtrace could not run %s: %s" % (script, proc.stdout[-500:]))
    texts, out = {}, set()
    for m in TRACE.finditer(proc.stdout):
        file, cmd = m.group("file"), m.group("cmd")
        words = cmd.split()
        if not words or file.endswith(".conf") or re.match(r"\w+=", words[0]):
            continue
        prog = words[0].rsplit("/", 1)[-1]
        if prog in ("modprobe", "insmod") and not any(w.startswith("ip_masq_") for w in words):
            continue
        if prog not in PROGRAMS + ("modprobe", "insmod"):
            continue
        if file not in texts:
            with open(os.path.join(directory, file)) as f:
                texts[file] = f.read().split("\n")
        line = first_line(texts[file], int(m.group("line")))
        if prog == "ipchains-restore":
            out |= restore_lines(directory, texts[file][line - 1])
            continue
        out.add("%s:%d" % (file, line))
    return out


def restore_lines(directory, command):
    """Return {'FILE:LINE'} of the rule lines an 'ipchains-restore < FILE' reads."""
    m = re.search(r"<\s*(\S+)", command)
    name = m.group(1)
    with open(os.path.join(directory, name)) as f:
        lines = f.read().split("\n")
    return {"%s:%d" % (os.path.normpath(name), n) for n, line in enumerate(lines, 1)
            if line.startswith((":", "-"))}
