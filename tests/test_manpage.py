"""man/tproxy.8 stays in step with tproxy's usage text and code.

Pure and fast: reads the docopt usage (tproxy.__doc__), the EX_* constants
and the groff source of the manual page; runs groff only to check that it
stays quiet. No root, no network.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

import tproxy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN_DIR = os.path.join(REPO, "man")
MAN_PAGE = os.path.join(MAN_DIR, "tproxy.8")


# ---------------------------------------------------------------------------
# The usage text
# ---------------------------------------------------------------------------

class UsageOption:
    """One entry of the usage's Options section."""

    def __init__(self, names, argument, description):
        self.names = names              # e.g. ["-h", "--help"]
        self.argument = argument        # e.g. "SECS", or None
        self.description = description  # the entry's text, joined into one line
        found = re.search(r"\[default:\s*([^\]]*)\]", description, re.IGNORECASE)
        self.default = found.group(1).strip() if found else None


def usage_options(doc):
    """Return {option name: UsageOption} from the Options section of DOC.

    An entry starts on a line whose first non-blank character is "-" at the
    section's option column (the smallest such indentation); deeper-indented
    lines continue the entry's description.
    """
    match = re.search(r"^Options:[ \t]*$(.*?)(?=^\S|\Z)", doc, re.MULTILINE | re.DOTALL)
    assert match, "tproxy's usage text has no 'Options:' section"
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    column = min(len(line) - len(line.lstrip()) for line in lines if line.lstrip().startswith("-"))
    entries = []
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if indent == column and line.lstrip().startswith("-"):
            head, _, text = line.strip().partition("  ")
            names, argument = [], None
            for word in head.split():
                if word.startswith("-"):
                    name, eq, arg = word.partition("=")
                    names.append(name)
                    if eq:
                        argument = arg
                elif argument is None:
                    argument = word
            entries.append([names, argument, [text.strip()]])
        else:
            assert entries, "usage Options section starts with a non-option line: %r" % line
            entries[-1][2].append(line.strip())
    options = {}
    for names, argument, text in entries:
        entry = UsageOption(names, argument, " ".join(t for t in text if t))
        for name in names:
            options[name] = entry
    return options


# ---------------------------------------------------------------------------
# The man page (groff -man source)
# ---------------------------------------------------------------------------

def plain(groff_text):
    """Return groff source text with escapes and font changes removed."""
    text = groff_text.replace("\\-", "-").replace("\\(em", "--").replace("\\e", "\\")
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)        # font changes
    text = re.sub(r"\\\((lq|rq|dq|aq)", '"', text)
    text = re.sub(r"\\[&|^c]", "", text)                     # zero-width escapes
    return text


def man_sections(source):
    """Return {section name: [source lines]} of a groff -man page."""
    sections, current = {}, None
    for line in source.splitlines():
        if line.startswith(".SH"):
            current = line[3:].strip().strip('"')
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def tagged_entries(lines):
    """Return [(tag line, body lines)] for the top-level .TP entries of LINES.

    A .TP inside .RS/.RE (a nested list) belongs to the entry around it.
    """
    entries, depth, after_tp = [], 0, False
    for line in lines:
        if line.startswith(".RS"):
            depth += 1
        elif line.startswith(".RE"):
            depth = max(0, depth - 1)
        if after_tp:
            entries.append((line, []))
            after_tp = False
        elif line.startswith(".TP") and depth == 0:
            after_tp = True
        elif entries:
            entries[-1][1].append(line)
    return entries


def tag_text(tag_line):
    """Return a tag line's text: the macro name dropped, quotes and escapes removed."""
    text = re.sub(r"^\.(B|I|R|BI|BR|IB|IR|RB|RI)\s+", "", tag_line)
    return plain(text).replace('"', "")


def option_names(text):
    """Return the option names (-x, --long-name) that TEXT mentions."""
    return re.findall(r"(?<![\w-])(--?[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*)", text)


@pytest.fixture(scope="module")
def man_source():
    assert os.path.exists(MAN_PAGE), "man/tproxy.8 is missing"
    with open(MAN_PAGE, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def sections(man_source):
    return man_sections(man_source)


@pytest.fixture(scope="module")
def man_options(sections):
    """Return {option name: (tag text, body text)} from the OPTIONS section."""
    assert "OPTIONS" in sections, "man/tproxy.8 has no OPTIONS section"
    options = {}
    for tag, body in tagged_entries(sections["OPTIONS"]):
        text = tag_text(tag)
        for name in option_names(text):
            assert name not in options, "man/tproxy.8 OPTIONS documents %s twice" % name
            options[name] = (text, plain("\n".join(body)))
    return options


@pytest.fixture(scope="module")
def usage():
    return usage_options(tproxy.__doc__)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def test_man_page_has_the_expected_sections(sections):
    wanted = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "HTTP TRANSLATION",
              "ORIGINAL DESTINATION", "TRANSPARENCY", "RETURN PATH", "LOGGING", "SIGNALS",
              "FILES", "EXIT STATUS", "EXAMPLES", "COMPATIBILITY", "CAVEATS", "SEE ALSO"]
    missing = [name for name in wanted if name not in sections]
    assert not missing, "man/tproxy.8 lacks section(s): %s" % ", ".join(missing)


def test_every_usage_option_is_documented(usage, man_options):
    missing = sorted(set(usage) - set(man_options))
    assert not missing, ("option(s) in tproxy's usage text but not in man/tproxy.8 OPTIONS: %s"
                         % ", ".join(missing))


def test_man_page_documents_no_option_the_usage_lacks(usage, man_options):
    extra = sorted(set(man_options) - set(usage))
    assert not extra, ("option(s) documented in man/tproxy.8 OPTIONS but absent from tproxy's "
                       "usage text: %s" % ", ".join(extra))


def test_option_arguments_match(usage, man_options):
    wrong = []
    for name, option in sorted(usage.items()):
        if name not in man_options:
            continue                    # reported by test_every_usage_option_is_documented
        tag = man_options[name][0].replace(" ", "")
        if option.argument and option.argument not in tag:
            wrong.append("%s takes %s in the usage, but the man page says %r"
                         % (name, option.argument, man_options[name][0]))
        synonyms = "|".join(re.escape(n) for n in option_names(tag))     # e.g. -V, --version
        if not option.argument and re.search(r"[=A-Z]", re.sub(synonyms, "", tag)):
            wrong.append("%s takes no argument in the usage, but the man page says %r"
                         % (name, man_options[name][0]))
    assert not wrong, "\n".join(wrong)


def test_usage_defaults_appear_in_man_page_entries(usage, man_options):
    wrong = []
    for name, option in sorted(usage.items()):
        if option.default is None or name not in man_options:
            continue
        body = man_options[name][1]
        word = r"(?<![\w.])%s(?![\w])" % re.escape(option.default)
        windows = [m.group(1) for m in re.finditer(r"\bdefault\b(.{0,60})", body,
                                                   re.IGNORECASE | re.DOTALL)]
        if not any(re.search(word, w) for w in windows):
            wrong.append("%s: the usage says [default: %s], the man page entry does not say "
                         "\"Default: %s\"" % (name, option.default, option.default))
    assert not wrong, "\n".join(wrong)


def test_options_are_in_alphabetical_order(sections):
    order = []
    for tag, _ in tagged_entries(sections["OPTIONS"]):
        names = option_names(tag_text(tag))
        if names:
            order.append(names[0])

    def key(name):
        bare = name.lstrip("-")
        return bare.lower(), bare != bare.lower()     # -p before -P, both before --prefork

    assert order == sorted(order, key=key), (
        "man/tproxy.8 OPTIONS are not in alphabetical order: %s" % " ".join(order))


def exit_statuses():
    """Return {value: name} of tproxy's EX_* constants."""
    return {getattr(tproxy, name): name for name in dir(tproxy)
            if name.startswith("EX_") and isinstance(getattr(tproxy, name), int)}


def test_every_exit_status_is_documented(sections):
    assert "EXIT STATUS" in sections, "man/tproxy.8 has no EXIT STATUS section"
    documented = {}
    for tag, body in tagged_entries(sections["EXIT STATUS"]):
        text = tag_text(tag).strip()
        if text.isdigit():
            documented[int(text)] = plain("\n".join(body))
    problems = []
    for value, name in sorted(exit_statuses().items()):
        if value not in documented:
            problems.append("%s = %d is not documented in EXIT STATUS" % (name, value))
        elif not re.search(r"\b%s\b" % name, documented[value]):
            problems.append("EXIT STATUS entry %d does not name %s" % (value, name))
    for value in sorted(set(documented) - set(exit_statuses())):
        problems.append("EXIT STATUS documents %d, which is no EX_* constant of tproxy.py" % value)
    assert not problems, "\n".join(problems)


def test_usage_text_has_no_phantom_options(usage):
    """docopt reads every line of the Options section that starts with "-" as an option."""
    docopt = pytest.importorskip("docopt")
    parse_options = getattr(docopt, "parse_options", None)
    if parse_options is None:
        pytest.skip("this docopt has no parse_options()")
    seen = set()
    for option in parse_options(tproxy.__doc__):
        seen.update(n for n in (getattr(option, "short", None), getattr(option, "longer", None),
                                getattr(option, "long", None)) if n)
    extra, missing = seen - set(usage), set(usage) - seen
    assert not extra, ("docopt reads option(s) %s from continuation lines of the usage text"
                       % ", ".join(sorted(extra)))
    assert not missing, ("docopt does not see option(s) %s of the usage text"
                         % ", ".join(sorted(missing)))


MAN_PAGES = sorted(glob.glob(os.path.join(MAN_DIR, "*.8")))


@pytest.mark.skipif(shutil.which("groff") is None,
                    reason="groff is not installed (apt-get install groff), cannot lint man pages")
@pytest.mark.parametrize("page", MAN_PAGES, ids=[os.path.basename(p) for p in MAN_PAGES])
def test_groff_is_quiet(page):
    result = subprocess.run(["groff", "-man", "-ww", "-z", page], capture_output=True,
                            text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, (
        "groff -man -ww -z %s (status %d):\n%s"
        % (os.path.relpath(page, REPO), result.returncode, output))
