"""A hostile script (or a bad day) cannot make the translation do more than
the script said: text copied from the input (file names bash reports, chain
names, values in error messages) never leaves its comment, string or line in
any format, and the ruleset loaded in a namespace leaves other tools' rules
alone.
"""
import os
import resource
import subprocess
import sys

import pytest

from translate import sandbox
from xlate_helpers import ROOT, run_tool

# The sourced file's name carries a ruleset line for each format: loaded, it
# would flush every table (nft) or the built-in INPUT chain (iptables-restore).
SOURCES_A_NAMED_FILE = r"""ipchains -P input DENY
f=$'/tmp/x"\nflush ruleset\n-F INPUT\n#'
printf 'ipchains -F input\nipchains -A input -s 192.0.2.1 -j ACCEPT\n' > "$f"
. "$f"
"""
INJECTED = ("flush ruleset", "-F INPUT")
FOREIGN = {
    "nft": ("nft add table inet other", "nft list tables", "table inet other"),
    "iptables-restore": ("iptables -A INPUT -s 203.0.113.9 -j DROP", "iptables -S INPUT",
                         "-A INPUT -s 203.0.113.9/32 -j DROP"),
}


@pytest.fixture
def bwrap():
    if sandbox.shutil.which("bwrap") is None:
        pytest.skip("bwrap (bubblewrap) is not installed")


def lines_of(text):
    return [line.strip() for line in text.split("\n")]


def load_beside_foreign(host, fmt, ruleset):
    """Load RULESET (FMT) in HOST after another tool's rule; return whether that rule survived."""
    add, show, foreign = FOREIGN[fmt]
    host.sh("nft flush ruleset; " + add)
    loader = ["nft", "-f", "-"] if fmt == "nft" else ["iptables-restore", "--noflush"]
    host.run(*loader, input=ruleset, check=False)
    return foreign in host.sh(show).stdout


@pytest.mark.parametrize("fmt", ["nft", "iptables-restore"])
def test_file_names_stay_in_their_comments(bwrap, tmp_path, netns_host, fmt):
    script = tmp_path / "names.sh"
    script.write_text(SOURCES_A_NAMED_FILE)
    status, out, err = run_tool(["--to=" + fmt, str(script)])
    assert status == 0, err
    for line in INJECTED:
        assert line not in lines_of(out), out
        assert line not in lines_of(err), err
    assert load_beside_foreign(netns_host, fmt, out)


def test_untranslated_values_stay_commented_in_every_format(tmp_path):
    # --partial loads what was translated; the gap's text must stay a comment.
    script = tmp_path / "values.sh"
    script.write_text("ipchains -A input -i \"eth0\ntouch %s/owned #\" -j ACCEPT\n"
                      "ipchains -A input -s 192.0.2.3 -j ACCEPT\n" % tmp_path)
    for fmt in ("iptables", "nft", "iptables-restore"):
        status, out, err = run_tool(["--to=" + fmt, "--partial", str(script)])
        assert status == 1, err
        assert not [line for line in lines_of(out) if line.startswith("touch")], out
        assert not [line for line in lines_of(err) if line.startswith("touch")], err


@pytest.mark.parametrize("name", ["a\n-F", "a b", "a\"b", "a\x7f", "a;accept", "c{}#"])
def test_chain_names_with_control_characters_or_blanks_are_refused(name):
    status, out, err = run_tool(["--to=iptables-restore", "--partial", "-"],
                                stdin="ipchains -N %s\n" % quote_for_sh(name))
    assert status == 1
    assert "error: bad chain name" in err
    assert "-F" not in lines_of(out)


def quote_for_sh(text):
    """Return TEXT as a bash $'...' word."""
    return "$'%s'" % "".join(c if c.isalnum() or c in " -" else "\\x%02x" % ord(c)
                             for c in text)


def test_translated_ruleset_keeps_foreign_chains_with_hostile_chain_name(netns_host):
    # A chain name holding a newline and -F was written as its own line:
    # iptables-restore then flushed every chain of the table.
    status, out, err = run_tool(["--to=iptables-restore", "--partial", "-"],
                                stdin="ipchains -N $'a\\n-F'\n"
                                      "ipchains -A input -s 192.0.2.3 -j ACCEPT\n")
    assert status == 1
    assert load_beside_foreign(netns_host, "iptables-restore", out)


def test_messages_are_one_line_each(tmp_path):
    script = tmp_path / "msg.sh"
    script.write_text("ipchains -A input -y $'\\nsh.sh:1: note: forged'\n"
                      "ipchains -A input -s 192.0.2.3 -j ACCEPT\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 1
    assert not [line for line in err.split("\n") if line.startswith("sh.sh:1")], err
    assert os.path.basename(str(script)) + ":1: error:" in err


# Each runs a DENY rule the way some scripts do: bash would run ipchains for
# each on a 2.2 host, so the translation has the rule or refuses (exit 2).
RUN_ELSEWHERE = {
    "which": 'IPCHAINS=`which ipchains`\n$IPCHAINS -A input -s 192.0.2.0/24 -j DENY\n',
    "xargs": 'echo "-A input -s 192.0.2.0/24 -j DENY" | xargs ipchains\n',
    "env": 'env ipchains -A input -s 192.0.2.0/24 -j DENY\n',
    "nice": 'nice -n 5 ipchains -A input -s 192.0.2.0/24 -j DENY\n',
    "sh": 'sh {dir}/rules.sh\n',
    "bash": 'bash {dir}/rules.sh\n',
    "exec": 'printf -- "-A input -s 192.0.2.0/24 -j DENY\\n" > /tmp/saved\n'
            'exec ipchains-restore < /tmp/saved\n',
}


@pytest.mark.parametrize("how", sorted(RUN_ELSEWHERE))
def test_commands_run_out_of_the_shells_sight_are_not_lost(bwrap, tmp_path, how):
    (tmp_path / "rules.sh").write_text("ipchains -A input -s 192.0.2.0/24 -j DENY\n")
    script = tmp_path / "fw.sh"
    script.write_text("ipchains -A input -s 198.51.100.7 -j ACCEPT\n" +
                      RUN_ELSEWHERE[how].format(dir=tmp_path))
    status, out, err = run_tool(["--to=nft", str(script)])
    if status == 2:
        assert "fw.sh: the script ran ipchains" in err and "nothing translated" in err
        assert out == ""
    else:
        assert status == 0, err
        assert "ip saddr 192.0.2.0/24 drop" in out, out


def peak_rss_mib(argv):
    """Run the translator with ARGV in a child; return (status, its peak RSS in MiB)."""
    code = ("import resource, subprocess, sys\n"
            "p = subprocess.run([sys.executable, '-m', 'translate'] + sys.argv[1:],\n"
            "                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    proc = subprocess.run([sys.executable, "-c", code] + argv, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    status, kib = proc.stdout.split()
    return int(status), int(kib) // 1024


def test_a_flood_on_stderr_is_not_kept(bwrap, tmp_path):
    script = tmp_path / "loud.sh"
    script.write_text("head -c 300000000 /dev/zero >&2\n"
                      "ipchains -A input -s 192.0.2.1 -j ACCEPT\n")
    status, mib = peak_rss_mib(["--to=nft", str(script)])
    assert status == 0
    assert mib < 150


def test_records_past_the_limit_stop_the_script(bwrap, tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_RECORDS", 1 << 20)
    monkeypatch.setattr(sandbox, "TIMEOUT", 30)
    script = tmp_path / "many.sh"
    script.write_text("x=$(printf %0100000d 0)\n"
                      "while :; do ipchains -A input -s \"$x\" -j ACCEPT; done\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 2 and out == ""
    assert "many.sh: the script recorded more than 1 MiB of commands in the sandbox" in err


def test_memory_of_the_script_is_limited(bwrap, tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "MEMORY", 100 << 20)
    script = tmp_path / "big.sh"
    script.write_text("x=$(head -c 200000000 /dev/zero | tr '\\0' a)\n"
                      "ipchains -A input -s 192.0.2.1 -j ACCEPT\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 2 and out == ""
    assert "big.sh: the script ran out of memory in the sandbox (100 MiB)" in err


def test_writable_places_are_small(bwrap, tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "TMPFS", 1 << 20)
    script = tmp_path / "fill.sh"
    script.write_text(
        "head -c 4000000 /dev/zero > /tmp/big || ipchains -A input -s 192.0.2.9 -j DENY\n"
        "head -c 4000000 /dev/zero > /run/big || ipchains -A input -s 192.0.2.10 -j DENY\n"
        "echo > /dev/big || ipchains -A input -s 192.0.2.11 -j DENY\n"
        "echo > /dev/shm/big || ipchains -A input -s 192.0.2.12 -j DENY\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 0, err
    for host in (9, 10, 11, 12):
        assert "ip saddr 192.0.2.%d drop" % host in out, out


def limit_memory():
    """Keep a translator that reads an endless device from taking the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


FORGED = 'printf "ipchains\\0%s\\0001\\0003\\0-A\\0input\\0-y\\0" >&$__xl_fd\n'


@pytest.mark.parametrize("path", ["/proc/self/environ", "/dev/zero", "{fifo}", "{hidden}"])
def test_forged_records_read_no_host_file(bwrap, tmp_path, path):
    # A record naming a file the sandbox never ran: the translator must not
    # read it on the host (its environment, an endless device, a FIFO that
    # never ends, a file of the host's /tmp the sandbox could not see).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    hidden = "/tmp/ipchains-translate-test-%d" % os.getpid()
    with open(hidden, "w") as f:
        f.write("SECRET_IN_HOST_TMP\n")
    try:
        script = tmp_path / "forge.sh"
        script.write_text("ipchains -A input -s 192.0.2.1 -j ACCEPT\n" +
                          FORGED % path.format(fifo=fifo, hidden=hidden))
        proc = subprocess.run([sys.executable, "-m", "translate", "--to=nft", str(script)],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=ROOT, SECRET_TOKEN="hunter2"),
                              preexec_fn=limit_memory)
    finally:
        os.unlink(hidden)
    assert proc.returncode == 1, proc.stderr
    assert "error: -y needs -p tcp" in proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr
    assert "SECRET_IN_HOST_TMP" not in proc.stdout + proc.stderr


HOSTILE_WORDS = {
    # Spanning lines, it ended the iptables-restore here-document of a run
    # of commands: the rest ran as shell commands.
    "lines": "\"$EXTIF\n-F\nIPCHAINS_TRANSLATE\ntouch {mark}\ncat <<IPCHAINS_TRANSLATE\"",
    # Single quotes do not quote in a here-document: $(...) ran.
    "quotes": "\"$EXTIF\"'$(touch {mark})'",
}


@pytest.mark.parametrize("how", sorted(HOSTILE_WORDS))
def test_words_kept_as_written_stay_in_their_command(tmp_path, netns_host, how):
    # A word with an expansion is copied as written into the script format;
    # what the script quoted must not run when the admin runs the translation.
    mark = tmp_path / "ran"
    script = tmp_path / "fw.sh"
    script.write_text("ipchains -A input -s 192.0.2.1 -j ACCEPT\n"
                      "ipchains -A input -i %s -j ACCEPT\n"
                      "ipchains -A input -s 192.0.2.3 -j ACCEPT\n"
                      % HOSTILE_WORDS[how].format(mark=mark))
    status, out, err = run_tool(["--to=iptables", str(script)])
    assert status == 0, err
    translated = tmp_path / "translated.sh"
    translated.write_text(out)
    add, show, foreign = FOREIGN["iptables-restore"]
    netns_host.sh("nft flush ruleset; " + add)
    netns_host.run("sh", str(translated), check=False, env=dict(os.environ, EXTIF="eth0"))
    assert not mark.exists()
    assert foreign in netns_host.sh(show).stdout
    assert "-A in-input -s 192.0.2.3/32" in netns_host.sh("iptables -S in-input").stdout


# Text bash reads as data: the static reader of the script format must read
# it so too, or the translation turns it into commands.
DATA_AS_BASH_READS_IT = {
    # $'...' ends at an unescaped quote only: \' is a quote inside it.
    "ansi-c": "ipchains -A input -s 192.0.2.1 -j ACCEPT -i $'eth\\'0'\necho '\n"
              "touch {mark}\n'\n# '\n",
    # A here-document's body is data, up to its delimiter line (here COMMIT,
    # a line of the translation's own here-documents).
    "here-document": "cat > {copy} <<COMMIT\nipchains -A input -s 192.0.2.1 -j ACCEPT\n"
                     "ipchains -A input -s 192.0.2.2 -j ACCEPT\ntouch {mark}\nCOMMIT\n",
    "here-document-tabs": "if true; then\n\tcat > {copy} <<-'EOF'\n"
                          "\tipchains -A input -s 192.0.2.1 -j ACCEPT\n"
                          "\tipchains -A input -s 192.0.2.2 -j ACCEPT\n\ttouch {mark}\n\tEOF\nfi\n",
}


@pytest.mark.parametrize("how", sorted(DATA_AS_BASH_READS_IT))
def test_the_script_format_keeps_data_data(tmp_path, netns_host, how):
    mark, copy = tmp_path / "ran", tmp_path / "copy"
    script = tmp_path / "fw.sh"
    text = (DATA_AS_BASH_READS_IT[how].format(mark=mark, copy=copy) +
            "ipchains -A input -s 192.0.2.3 -j ACCEPT\n")
    script.write_text(text)
    original = tmp_path / "original.sh"
    original.write_text("ipchains() { :; }\n" + text)
    netns_host.run("bash", str(original), check=False)
    expected = copy.read_text() if copy.exists() else None
    assert not mark.exists()
    status, out, err = run_tool(["--to=iptables", str(script)])
    assert status == 0, err
    translated = tmp_path / "translated.sh"
    translated.write_text(out)
    netns_host.sh("nft flush ruleset")
    netns_host.run("bash", str(translated), check=False)
    assert not mark.exists(), out
    assert (copy.read_text() if copy.exists() else None) == expected
    assert "-A in-input -s 192.0.2.3/32" in netns_host.sh("iptables -S in-input").stdout


@pytest.mark.parametrize("fmt", ["nft", "iptables-restore"])
def test_other_firewall_tools_in_the_script_fail_closed(bwrap, tmp_path, fmt):
    # The DROP rules loaded with iptables were missing from a ruleset that
    # loaded with exit 0, accepting what the script dropped.
    script = tmp_path / "mixed.sh"
    script.write_text("iptables -P INPUT DROP\n"
                      "/sbin/iptables -A INPUT -s 192.0.2.0/24 -j DROP\n"
                      "ipchains -A input -s 192.0.2.7 -j ACCEPT\n")
    status, out, err = run_tool(["--to=" + fmt, str(script)])
    assert status == 1
    assert "mixed.sh:1: error: iptables command left out" in err
    assert "mixed.sh:2: error: iptables command left out" in err
    first = [line for line in out.split("\n") if not line.startswith("#!")][0]
    assert first.startswith("ipchains-translate: incomplete translation")


def test_secrets_of_the_host_are_hidden(bwrap, tmp_path):
    # The script runs as root (no capabilities, but owner of root's files):
    # what it reads can reach the output, through a value or a message.
    secrets = [p for p in ("/etc/shadow", "/etc/gshadow") if os.path.isfile(p)]
    if not secrets:
        pytest.skip("no /etc/shadow here")
    with open(secrets[0]) as f:
        first = f.readline().split(":")[0] + ":"
    script = tmp_path / "nosy.sh"
    script.write_text("".join('ipchains -A input -i "$(head -c 30 %s)" -j ACCEPT\n' % p
                              for p in secrets) +
                      'ipchains -A input -i "$(ls -A /root | head -c 100)x" -j ACCEPT\n'
                      "ipchains -A input -s 192.0.2.1 -j ACCEPT\n")
    status, out, err = run_tool(["--to=nft", "--partial", str(script)])
    assert first not in out + err
    assert ".bashrc" not in out + err and ".profile" not in out + err


CONNECTS = ('python3 -c "import socket, sys; s = socket.socket(socket.AF_UNIX); '
            's.connect(sys.argv[1]); s.send(b\'out\')" %s\n')


def test_no_unix_socket_of_the_host_is_reached(bwrap, tmp_path):
    # Sockets answer connect() on a read-only mount: one in the script's
    # directory (or the host's /tmp, where tmux keeps root's) was reached.
    import socket
    path = str(tmp_path / "listening")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        script = tmp_path / "fw.sh"
        script.write_text(CONNECTS % path + "ipchains -A input -s 192.0.2.1 -j ACCEPT\n")
        status, out, err = run_tool(["--to=nft", str(script)])
        assert status == 0, err
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.parametrize("where", ["/", "/tmp", "/run"])
def test_the_working_directory_does_not_open_private_places(bwrap, tmp_path, monkeypatch,
                                                              where):
    # Run from / or /tmp, the working directory was bound over the sandbox's
    # own /tmp: the stand-ins vanished and the host's /tmp and /run showed.
    hidden = "/tmp/ipchains-translate-test-%d" % os.getpid()
    with open(hidden, "w") as f:
        f.write("SECRET_IN_HOST_TMP\n")
    try:
        script = tmp_path / "fw.sh"
        script.write_text('ipchains -A input -i "$(cat %s)x" -j ACCEPT\n'
                          "ipchains -A input -s 192.0.2.1 -j ACCEPT\n" % hidden)
        monkeypatch.chdir(where)
        status, out, err = run_tool(["--to=nft", str(script)])
    finally:
        os.unlink(hidden)
    assert status == 0, err
    assert "ip saddr 192.0.2.1 accept" in out
    assert "SECRET_IN_HOST_TMP" not in out + err


def test_a_script_starting_with_the_colon_command_runs_in_bash(bwrap, tmp_path):
    # ': ${EXTIF:=eth0}' made the script an ipchains-save file: no shell ran.
    script = tmp_path / "colon.sh"
    script.write_text("#!/bin/sh\n: ${EXTIF:=eth0}\nipchains -P input DENY\nOPEN=no\n"
                      'if [ "$OPEN" = yes ]; then\n  ipchains -A input -s 0/0 -j ACCEPT\nfi\n'
                      "ipchains -A input -i $EXTIF -s 192.0.2.0/24 -j ACCEPT\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 0, err
    assert 'iifname "eth0" ip saddr 192.0.2.0/24 accept' in out
    assert "colon.sh:6" not in out + err


def test_a_closed_record_channel_fails_closed(bwrap, tmp_path):
    # A script that closes every descriptor above 2 (as daemons do) lost the
    # records of the commands after it: their DENY rules were missing.
    script = tmp_path / "closer.sh"
    script.write_text("ipchains -A input -s 198.51.100.7 -j ACCEPT\n"
                      "for fd in $(ls /proc/$$/fd); do\n"
                      "  [ $fd -gt 2 ] && eval \"exec $fd>&-\"\ndone\n"
                      "ipchains -A input -s 192.0.2.0/24 -j DENY\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 2 and out == ""
    assert "closer.sh: the script closed the stand-ins' record channel" in err


def test_host_names_the_script_computes_are_not_looked_up(bwrap, tmp_path):
    # The translator resolves names outside the sandbox: a name built from
    # what the script read ($(cat FILE).attacker.example) would carry it out
    # in a DNS query.  Names written in the script's text are looked up.
    script = tmp_path / "dns.sh"
    script.write_text('ipchains -A input -s "$(echo bG9jYWxob3N0 | base64 -d)" -j DENY\n'
                      "ipchains -A input -s 192.0.2.1 -j ACCEPT\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 1
    assert ("dns.sh:1: error: host name 'localhost' was computed by the script; it is not "
            "looked up (give --host localhost=ADDRESS)") in err
    written = tmp_path / "written.sh"
    written.write_text("H=localhost\nipchains -A input -s $H -j ACCEPT\n")
    status, out, err = run_tool(["--to=nft", str(written)])
    assert status == 0, err
    assert "ip saddr 127.0.0.1 accept" in out


def test_a_host_name_written_in_a_file_cited_later_is_looked_up(bwrap, tmp_path):
    # Records are understood while bash still runs; a name written only in
    # a sourced file whose first command comes later (after a pause, so in a
    # later read of the record pipe) is still one the script's texts hold.
    (tmp_path / "lib.sh").write_text("peer() { echo localhost; }\n"
                                     "late() { ipchains -A input -j DENY; }\n")
    script = tmp_path / "main.sh"
    script.write_text('. "$(dirname "$0")/lib.sh"\n'
                      'ipchains -A input -s "$(peer)" -j ACCEPT\n'
                      "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done\n"
                      "late\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 0, err
    assert "ip saddr 127.0.0.1 accept" in out and "main.sh:2" in out
    assert "lib.sh:2" in out


def test_record_for_a_line_past_the_end_of_its_file_is_cited_by_what_it_recorded(bwrap, tmp_path):
    # Well-formed records of the script's own file at lines it does not have
    # (bash reports such lines for a long eval, too) were cited as ''.
    script = tmp_path / "forge.sh"
    script.write_text("ipchains -A input -s 192.0.2.1 -j ACCEPT\n"
                      "printf '%s\\0%s\\0%s\\0%s\\0%s\\0' iptables \"$BASH_SOURCE\" 99 1 -L >&$__xl_fd\n"
                      "printf '%s\\0%s\\0%s\\0%s\\0%s\\0%s\\0%s\\0' ipchains \"$BASH_SOURCE\" 77 3 "
                      "-A input -y >&$__xl_fd\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 1, err
    assert "''" not in err
    assert "%s:99: error: iptables command left out" % script in err
    assert "'recorded as: iptables -L (%s has no line 99: it has 3 lines)'" % script in err
    assert "%s:77: error: -y needs -p tcp: 'recorded as: ipchains -A input -y (%s has no line 77: " \
        "it has 3 lines)'" % (script, script) in err
    assert "# %s:77: untranslated (-y needs -p tcp): recorded as: ipchains -A input -y" % script in out


@pytest.mark.parametrize("record", [
    # An ipchains-restore record carries two fields (its file, its data).
    'restore\\0f\\0001\\0001\\0x\\0',
    # A line number in other digits than ASCII ones.
    'ipchains\\0f\\0\xb2\\0000\\0',
    # A line number or an argument count too long for int() (4,300 digits).
    'ipchains\\0f\\0' + '9' * 5000 + '\\0000\\0',
    'ipchains\\0f\\0001\\0' + '9' * 5000 + '\\0-A\\0'])
def test_malformed_forged_records_are_one_located_refusal(bwrap, tmp_path, record):
    # All were internal errors (IndexError, ValueError) before.
    script = tmp_path / "forge.sh"
    script.write_text('ipchains -A input -j ACCEPT\nprintf "%s" >&$__xl_fd\n' % record)
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 2 and out == ""
    assert err.strip().endswith("forge.sh: the script wrote into the stand-ins' record "
                                "stream; nothing translated")
    assert "internal error" not in err
