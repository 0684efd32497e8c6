"""ipchains-translate's own lines on stderr: progress on a terminal, the closing summary.

Kept apart from the translation: cli.py starts a Progress, names each stage,
and prints summary() at the end.
"""
import threading
import time

PROG = "ipchains-translate"


class Progress:
    """A line on a terminal saying which stage runs, redrawn each second once a run passes one.

    Does nothing when STREAM is not a terminal (files, pipes, the golden tests).
    """

    DELAY = 1.0

    def __init__(self, stream):
        self.stream = stream
        self.started = time.monotonic()
        self.what = "reading"
        self.shown = False
        self.done = threading.Event()
        self.thread = None
        if stream.isatty():
            self.thread = threading.Thread(target=self._redraw, daemon=True)
            self.thread.start()

    def stage(self, what):
        """Say that WHAT ("translating 3 inputs") runs from now on."""
        self.what = what

    def _redraw(self):
        while not self.done.wait(self.DELAY):
            self.stream.write("\r%s: %s... %d s\033[K"
                              % (PROG, self.what, time.monotonic() - self.started))
            self.stream.flush()
            self.shown = True

    def close(self):
        """Stop redrawing and erase the line; return the seconds since the start."""
        self.done.set()
        if self.thread is not None:
            self.thread.join()
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
        return time.monotonic() - self.started


def commands_read(result):
    """Return how many ipchains/ipmasqadm commands the translation read."""
    return getattr(result, "commands", 0)


def rules_written(text, fmt):
    """Return how many rules TEXT holds: -A/-I commands and batch lines (iptables formats),
    chain lines (nft), add/insert rule commands (nft snippets)."""
    count = 0
    blocks = []                 # nft: the kinds of the blocks open at this line ("table", "chain")
    for line in text.split("\n"):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if fmt == "nft":
            if words[0] == "nft":           # a snippet: one nft command per rule
                count += words[1:3] in (["'add", "rule"], ["'insert", "rule"])
                continue
            if words[-1] == "{":
                blocks.append(words[0])
            elif words == ["}"]:
                blocks.pop()
            elif blocks[-1:] == ["chain"] and words[0] not in ("type", "policy"):
                count += 1
            continue
        if fmt == "iptables" and words[0] not in ("iptables", "ip6tables"):
            # A line of an iptables-restore --noflush batch (a here-document).
            count += words[0] in ("-A", "-I")
            continue
        if fmt == "iptables-restore":
            words = words[:1]
        if "-A" in words or "-I" in words:
            count += 1
    return count


def summary(result, fmt, seconds):
    """Return the closing line: commands read, rules written, diagnostics by level, time."""
    levels = {"note": 0, "warning": 0, "error": 0}
    for diag in result.diags:
        levels[diag.level] = levels.get(diag.level, 0) + 1
    return ("%s: %d commands read, %d rules written, %d notes, %d warnings, %d errors, %.2f s"
            % (PROG, commands_read(result), rules_written(result.text, fmt),
               levels["note"], levels["warning"], levels["error"], seconds))


def check_plan(text, fmt):
    """Return the line that says what --check loads, with what, where."""
    tool = "nft -c -f, then nft -f twice" if fmt == "nft" else \
        "iptables-restore --test, then iptables-restore"
    return ("%s: check: loading %d rules with %s in a private network namespace "
            "(unshare --net); nothing outside it changes" % (PROG, rules_written(text, fmt), tool))
