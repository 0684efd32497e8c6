"""Reads shell scripts: words, commands, blocks, variables, ipchains invocations.

``tokenize`` turns the text into words and operators (quotes, escapes,
continuation lines, comments, ``$VAR``/``${VAR}``/``$(...)``/backticks);
``parse`` groups them into a tree of commands and blocks (``for``, functions,
``if``/``while``/``case``...).  Two walkers read the tree:

* ``flatten`` evaluates it as far as the flat formats need: top-level
  assignments and ``-D`` values, ``for`` loops over literal words and simple
  functions are unrolled; an ipchains command inside other shell logic, or
  using a value the script computes, is reported with its line.
* ``in_place`` finds every invocation where it stands, for the shell-script
  format; words holding expansions are kept as written (``Raw``).
"""
import re
from dataclasses import dataclass, field
from typing import List, Optional

from .ir import Raw, SourceRef

PLAIN_RUN = re.compile(r"[^ \t\r\n'\"\\$`;&|()<>]+")
TOKEN = re.compile(r"""
    (?P<blank>[ \t\r]+)
  | (?P<cont>\\\n)
  | (?P<comment>\#[^\n]*)
  | (?P<op>\n|;;|&&|\|\||[;&|()]|[<>][>&]?)
  | (?P<plain>[^ \t\r\n'"\\$`;&|()<>]+)
  | (?P<sq>'[^']*')
  | (?P<var>\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\}|[0-9@*\#?$!-]))
""", re.X)
# A line of plain words and $NAME / ${NAME} expansions, read without the
# character-level scanner (most lines of a firewall script are like this).
SIMPLE_LINE = re.compile(
    r"[ \t]*(?:(?:[^\s'\"\\`;&|()<>#$]|\$(?:[A-Za-z_]\w*|\{[A-Za-z_]\w*\}))+"
    r"(?:[ \t]+|(?=\n|\Z)))*(?=\n|\Z)")
# A here-document's operator and delimiter word (quoted or not); not '<<<'.
HEREDOC = re.compile(r"""<<(-?)[ \t]*(?:'([^'\n]*)'|"([^"\n]*)"|\\?([^\s;&|()<>'"]+))""")
# $'...' escapes (bash's ANSI-C quoting); \xHH, \NNN, \uHHHH and \cX are decoded apart.
ANSI_C = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r",
          "t": "\t", "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}
ANSI_C_NUMBER = re.compile(r"[0-7]{1,3}|x[0-9A-Fa-f]{1,2}|u[0-9A-Fa-f]{1,4}|U[0-9A-Fa-f]{1,8}|c.",
                           re.S)
VAR_REF = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
KEYWORDS = {"if", "then", "elif", "else", "fi", "for", "while", "until", "do",
            "done", "case", "esac", "{", "}", "function", "!"}
OPENERS = {"if": "fi", "while": "done", "until": "done", "case": "esac"}
MAX_DEPTH = 32


class ShellError(Exception):
    """The script cannot be read (say, an unterminated quote)."""


class Word:
    """A shell word: its raw text and parts (kind, value, quoted).

    Plain words (no quotes, no escapes) get their parts only when asked:
    most words of a firewall script are plain and are only read as text.
    """

    __slots__ = ("raw", "_parts", "line")

    def __init__(self, raw, parts, line):
        self.raw = raw
        self._parts = parts
        self.line = line

    def __repr__(self):
        return "Word(%r)" % self.raw

    @property
    def parts(self):
        if self._parts is None:
            self._parts = _plain_parts(self.raw)
        return self._parts

    @property
    def plain(self):
        """True for a word of plain characters without expansions."""
        return self._parts is None and "$" not in self.raw

    def literal(self):
        """Return the text when the word has no expansion, else None."""
        if self.plain:
            return self.raw
        if all(kind == "lit" for kind, _, _ in self.parts):
            return "".join(v for _, v, _ in self.parts)
        return None

    def unquoted_literal(self):
        """Return the text of a plain unquoted word (keywords), else None."""
        if self.plain:
            return self.raw
        if all(kind == "lit" and not quoted for kind, _, quoted in self.parts):
            return "".join(v for _, v, _ in self.parts)
        return None


@dataclass
class Op:
    """An operator token (newline, ';', '&&', '(', '>', ...)."""

    text: str
    line: int


# ---------------------------------------------------------------- tokens


class _Scanner:
    """Splits shell text into Word and Op tokens, tracking line numbers."""

    def __init__(self, text):
        self.s = text
        self.i = 0
        self.line = 1
        self.tokens = []
        self.heredocs = []      # (delimiter, strip tabs, Word) read at the next line end

    def peek(self, k=0):
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def advance(self):
        c = self.s[self.i]
        self.i += 1
        if c == "\n":
            self.line += 1
        return c

    def simple_line(self):
        """Read a whole line of plain words at once, if it is one; True if read."""
        m = SIMPLE_LINE.match(self.s, self.i)
        if m is None or m.end() == self.i:
            return False
        line = self.line
        words = [Word(raw, None, line) for raw in m.group().split()]
        self.i = m.end()
        if words and words[0].raw not in KEYWORDS:
            # A whole simple command: hand it to the parser ready-made.
            self.tokens.append(Cmd(words, [], self.line, self.line))
        else:
            self.tokens.extend(words)
        return True

    def run(self):
        parts, raw_start, start_line = [], None, self.line
        n = len(self.s)
        self.simple_line()
        while self.i < n:
            m = TOKEN.match(self.s, self.i)
            kind = m.lastgroup if m else None
            if kind == "comment" and raw_start is not None:
                kind = None
            if kind == "cont":
                # A continuation line: the backslash and newline vanish.
                self.i = m.end()
                self.line += 1
            elif kind in ("blank", "comment"):
                self.flush(parts, raw_start, start_line)
                parts, raw_start = [], None
                self.i = m.end()
            elif kind == "op":
                self.flush(parts, raw_start, start_line)
                parts, raw_start = [], None
                if self.here_document():
                    continue
                self.tokens.append(Op(m.group(), self.line))
                self.i = m.end()
                if m.group() == "\n":
                    self.line += 1
                    self.skip_heredoc_bodies()
                    self.simple_line()
            else:
                if raw_start is None:
                    raw_start, start_line = self.i, self.line
                if kind == "plain":
                    parts.append(("lit", m.group(), False))
                    self.i = m.end()
                elif kind == "sq":
                    parts.append(("lit", m.group()[1:-1], True))
                    self.line += m.group().count("\n")
                    self.i = m.end()
                elif kind == "var":
                    parts.append(("var", m.group()[1:].strip("{}"), False))
                    self.i = m.end()
                else:
                    self.word_part(parts)
        self.flush(parts, raw_start, start_line)
        self.skip_heredoc_bodies()
        return self.tokens

    def here_document(self):
        """Read '<<WORD' (or '<<-WORD') here, if it is one; True if read.

        The body, from the next line to the delimiter line, is data to bash:
        it is skipped at the line end (skip_heredoc_bodies), and the
        delimiter Word then carries the delimiter's line, so the command
        spans its here-document.
        """
        m = HEREDOC.match(self.s, self.i)
        if m is None or self.s.startswith("<<<", self.i):
            return False
        delim = next(g for g in m.groups()[1:] if g is not None)
        word = Word(m.group()[2:].lstrip("- \t"), [("lit", delim, True)], self.line)
        self.tokens += [Op("<<", self.line), word]
        self.heredocs.append((delim, m.group(1) == "-", word))
        self.i = m.end()
        return True

    def skip_heredoc_bodies(self):
        """Skip the bodies of the here-documents opened on the line just ended."""
        for delim, strip, word in self.heredocs:
            for _ in range(len(self.s) + 1):
                if self.i >= len(self.s):
                    break
                end = self.s.find("\n", self.i)
                end = len(self.s) if end < 0 else end
                line = self.s[self.i:end]
                self.i = min(end + 1, len(self.s))
                self.line += 1
                if (line.lstrip("\t") if strip else line) == delim:
                    break
            word.line = self.line - 1
        self.heredocs = []

    def operator(self, parts):
        c, n = self.peek(), self.peek(1)
        if c == "\n":
            return "\n"
        if c in ";&|" and n == c:
            return c + c
        if c in ";&|()":
            return c
        if c in "<>":
            return c + n if n in ">&" else c
        return None

    def flush(self, parts, raw_start, line):
        if raw_start is None:
            return
        raw = self.s[raw_start:self.i].replace("\\\n", "")
        # '2>' style redirections: the digits belong to the operator.
        if raw.isdigit() and self.peek() and self.peek() in "<>":
            self.tokens.append(Op(raw, line))
            return
        self.tokens.append(Word(raw, parts, line))

    def word_part(self, parts):
        c = self.peek()
        if c == "'":
            self.advance()
            start = self.i
            while self.i < len(self.s) and self.peek() != "'":
                self.advance()
            if self.i >= len(self.s):
                raise ShellError("line %d: unterminated single quote" % self.line)
            parts.append(("lit", self.s[start:self.i], True))
            self.advance()
        elif c == '"':
            self.advance()
            self.double_quoted(parts)
        elif c == "\\":
            self.advance()
            if self.i < len(self.s):
                parts.append(("lit", self.advance(), True))
        elif c == "$":
            self.dollar(parts, quoted=False)
        elif c == "`":
            self.backtick(parts, quoted=False)
        else:
            run = PLAIN_RUN.match(self.s, self.i)
            if run is None:
                parts.append(("lit", self.advance(), False))
            else:
                parts.append(("lit", run.group(), False))
                self.i = run.end()

    def double_quoted(self, parts):
        for _ in range(len(self.s) + 1):
            if self.i >= len(self.s):
                raise ShellError("line %d: unterminated double quote" % self.line)
            c = self.peek()
            if c == '"':
                self.advance()
                parts.append(("lit", "", True))
                return
            if c == "\\" and self.peek(1) in '"\\$`\n':
                self.advance()
                nxt = self.advance()
                if nxt != "\n":
                    parts.append(("lit", nxt, True))
            elif c == "$":
                self.dollar(parts, quoted=True)
            elif c == "`":
                self.backtick(parts, quoted=True)
            else:
                parts.append(("lit", self.advance(), True))

    def dollar(self, parts, quoted):
        start = self.i
        self.advance()
        c = self.peek()
        if c == "(":
            self.balanced("(", ")")
            parts.append(("sub", self.s[start:self.i], quoted))
        elif c == "{":
            self.balanced("{", "}")
            inner = self.s[start + 2:self.i - 1]
            if inner and (inner.replace("_", "a").isalnum()):
                parts.append(("var", inner, quoted))
            else:
                parts.append(("sub", self.s[start:self.i], quoted))
        elif c == "'" and not quoted:
            self.ansi_c(parts)
        elif c == '"' and not quoted:
            # $"..." is a double-quoted string (translated by the locale).
            return
        elif c.isalpha() or c == "_":
            while self.peek() and (self.peek().isalnum() or self.peek() == "_"):
                self.advance()
            parts.append(("var", self.s[start + 1:self.i], quoted))
        elif c and (c.isdigit() or c in "@*#?$!-"):
            self.advance()
            parts.append(("var", c, quoted))
        else:
            parts.append(("lit", "$", quoted))

    def ansi_c(self, parts):
        """Read the rest of $'...' (at its quote), escapes decoded as bash does."""
        self.advance()
        out = []
        for _ in range(len(self.s) + 1):
            if self.i >= len(self.s):
                raise ShellError("line %d: unterminated $'...' quote" % self.line)
            c = self.advance()
            if c == "'":
                break
            if c != "\\" or self.i >= len(self.s):
                out.append(c)
                continue
            m = ANSI_C_NUMBER.match(self.s, self.i)
            if m is not None:
                self.i = m.end()
                out.append(_ansi_c_number(m.group()))
            else:
                e = self.advance()
                out.append(ANSI_C.get(e, "\\" + e))
        parts.append(("lit", "".join(out), True))

    def balanced(self, open_c, close_c):
        depth = 0
        for _ in range(len(self.s) + 1):
            if self.i >= len(self.s):
                raise ShellError("line %d: unterminated %s" % (self.line, open_c))
            c = self.advance()
            if c == "\\":
                if self.i < len(self.s):
                    self.advance()
            elif c == "'":
                while self.i < len(self.s) and self.advance() != "'":
                    pass
            elif c == open_c:
                depth += 1
            elif c == close_c:
                depth -= 1
                if depth == 0:
                    return

    def backtick(self, parts, quoted):
        start = self.i
        self.advance()
        while self.i < len(self.s) and self.peek() != "`":
            if self.peek() == "\\":
                self.advance()
            self.advance()
        if self.i >= len(self.s):
            raise ShellError("line %d: unterminated backquote" % self.line)
        self.advance()
        parts.append(("sub", self.s[start:self.i], quoted))


def _ansi_c_number(esc):
    """Return the character of a $'...' escape ESC (after the backslash): octal, \\x, \\u, \\c."""
    if esc[0] == "c":
        return chr(ord(esc[1]) & 0x1f)
    if esc[0] in "xuU":
        code = int(esc[1:], 16)
    else:
        code = int(esc, 8) & 0xff
    try:
        return chr(code)
    except (ValueError, OverflowError):
        return "?"


def _plain_parts(raw):
    """Return the parts of a plain word: literals and $NAME references."""
    if "$" not in raw:
        return [("lit", raw, False)]
    parts, pos = [], 0
    for m in VAR_REF.finditer(raw):
        if m.start() > pos:
            parts.append(("lit", raw[pos:m.start()], False))
        parts.append(("var", m.group(1) or m.group(2), False))
        pos = m.end()
    if pos < len(raw):
        parts.append(("lit", raw[pos:], False))
    return parts


def tokenize(text):
    """Return the Word and Op tokens of shell TEXT."""
    return _Scanner(text).run()


# ---------------------------------------------------------------- tree


@dataclass
class Cmd:
    """A simple command: words, redirections (raw), first and last line."""

    words: List[Word]
    redirs: List[str]
    line: int
    end_line: int
    alone: bool = True


@dataclass
class Block:
    """A compound command: kind is for, func, group, if, while, until, case, subshell."""

    kind: str
    line: int
    body: list = field(default_factory=list)
    var: Optional[str] = None
    words: List[Word] = field(default_factory=list)
    name: Optional[str] = None


class _Parser:
    """Groups tokens into commands and blocks."""

    def __init__(self, tokens):
        self.t = tokens
        self.i = 0
        self.busy = set()       # lines holding keywords or case patterns

    def peek(self, k=0):
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def is_op(self, tok, *texts):
        return isinstance(tok, Op) and (not texts or tok.text in texts)

    def keyword(self, tok):
        return tok.unquoted_literal() if isinstance(tok, Word) else None

    def parse_list(self, enders, in_case=False):
        """Parse commands until a keyword in ENDERS starts one; return (nodes, ender)."""
        nodes = []
        for _ in range(len(self.t) + 1):
            tok = self.peek()
            if tok is None:
                return nodes, None
            if self.is_op(tok, "\n", ";", "&", "&&", "||", "|", ";;"):
                self.i += 1
                continue
            kw = self.keyword(tok)
            if kw in enders:
                self.busy.add(tok.line)
                self.i += 1
                return nodes, kw
            if in_case and self.case_pattern():
                continue
            node = self.command()
            if node is not None:
                nodes.append(node)
        return nodes, None

    def case_pattern(self):
        """Skip 'pat|pat)' at the start of a case branch; True if one was there."""
        for k in range(0, 40):
            tok = self.peek(k)
            if tok is None or self.is_op(tok, "\n", ";", ";;"):
                return False
            if self.is_op(tok, ")"):
                self.busy.add(tok.line)
                self.i += k + 1
                return True
            if self.is_op(tok, "(") and k == 0:
                continue
            if not (isinstance(tok, Word) or self.is_op(tok, "|")):
                return False
        return False

    def command(self):
        tok = self.peek()
        if isinstance(tok, Cmd):
            self.i += 1
            return tok
        kw = self.keyword(tok)
        line = tok.line
        if self.is_op(tok, "("):
            self.i += 1
            body, _ = self.until_op(")")
            return Block("subshell", line, body)
        if kw == "!":
            self.i += 1
            return None
        if kw in OPENERS:
            self.i += 1
            if kw == "case":
                self.skip_until_kw("in")
                body, _ = self.parse_list({"esac"}, in_case=True)
            else:
                body, _ = self.parse_list({OPENERS[kw]})
            return Block(kw, line, body)
        if kw in ("then", "else", "elif", "do"):
            self.busy.add(tok.line)
            self.i += 1
            return None
        if kw == "{":
            self.i += 1
            body, _ = self.parse_list({"}"})
            return Block("group", line, body)
        if kw == "for":
            return self.for_loop(line)
        if kw == "function":
            self.i += 1
            name = self.peek()
            self.i += 1
            if self.is_op(self.peek(), "(") and self.is_op(self.peek(1), ")"):
                self.i += 2
            return self.function_body(name.raw if isinstance(name, Word) else "?", line)
        if isinstance(tok, Word) and self.is_op(self.peek(1), "(") and self.is_op(self.peek(2), ")"):
            self.i += 3
            return self.function_body(tok.raw, line)
        if isinstance(tok, Op) and tok.text in ")}":
            self.i += 1
            return None
        return self.simple()

    def until_op(self, text):
        nodes = []
        for _ in range(len(self.t) + 1):
            tok = self.peek()
            if tok is None:
                return nodes, None
            if self.is_op(tok, text):
                self.i += 1
                return nodes, text
            if self.is_op(tok, "\n", ";", "&", "&&", "||", "|"):
                self.i += 1
                continue
            node = self.command()
            if node is not None:
                nodes.append(node)
        return nodes, None

    def skip_until_kw(self, kw):
        for _ in range(len(self.t) + 1):
            tok = self.peek()
            if tok is None:
                return
            self.i += 1
            if self.keyword(tok) == kw:
                return

    def for_loop(self, line):
        self.i += 1
        var = self.peek()
        self.i += 1
        words = []
        if self.keyword(self.peek()) == "in":
            self.i += 1
            while isinstance(self.peek(), Word):
                words.append(self.peek())
                self.i += 1
        else:
            words = None
        for _ in range(len(self.t) + 1):
            tok = self.peek()
            if tok is None or self.keyword(tok) == "do":
                break
            self.i += 1
        if self.peek() is not None:
            self.i += 1
        body, _ = self.parse_list({"done"})
        block = Block("for", line, body, var=var.raw if isinstance(var, Word) else "?")
        block.words = words if words is not None else [Word('"$@"', [("var", "@", True)], line)]
        return block

    def function_body(self, name, line):
        for _ in range(len(self.t) + 1):
            tok = self.peek()
            if not self.is_op(tok, "\n"):
                break
            self.i += 1
        tok = self.peek()
        if tok is None:
            body = []
        elif self.keyword(tok) == "{":
            self.i += 1
            body, _ = self.parse_list({"}"})
        else:
            node = self.command()
            body = [node] if node is not None else []
        return Block("func", line, body, name=name)

    def simple(self):
        words, redirs = [], []
        first = self.peek().line
        last = first
        for _ in range(len(self.t) + 1):
            tok = self.peek()
            if tok is None:
                break
            if isinstance(tok, Op):
                if tok.text[-1:] in "<>" or tok.text in (">&", "<&") or tok.text.isdigit():
                    op = tok.text
                    self.i += 1
                    if tok.text.isdigit() and self.is_op(self.peek()):
                        op += self.peek().text
                        self.i += 1
                    target = self.peek()
                    if isinstance(target, Word):
                        self.i += 1
                        redirs.append(op + target.raw)
                        last = max(last, target.line)
                    continue
                break
            words.append(tok)
            last = max(last, tok.line + tok.raw.count("\n"))
            self.i += 1
        if not words:
            return None
        return Cmd(words, redirs, first, last)


def parse(text):
    """Return the tree (list of Cmd and Block) of shell TEXT; ShellError if unreadable."""
    parser = _Parser(tokenize(text))
    nodes, _ = parser.parse_list(set())
    _mark_alone(nodes, parser.busy)
    return nodes


def _walk_cmds(nodes):
    for node in nodes:
        if isinstance(node, Cmd):
            yield node
        else:
            yield from _walk_cmds(node.body)


def _all_lines(nodes):
    """Yield (line, owner) for every line a command or block header occupies."""
    for node in nodes:
        if isinstance(node, Cmd):
            for line in range(node.line, node.end_line + 1):
                yield line, id(node)
        else:
            yield node.line, id(node)
            yield from _all_lines(node.body)


def _mark_alone(nodes, busy):
    owners = {line: {"keyword"} for line in busy}
    for line, owner in _all_lines(nodes):
        owners.setdefault(line, set()).add(owner)
    for cmd in _walk_cmds(nodes):
        cmd.alone = all(owners.get(line) == {id(cmd)}
                        for line in range(cmd.line, cmd.end_line + 1))


# ---------------------------------------------------------------- evaluation


class Unknown:
    """A value the script computes at run time; ``why`` says where."""

    def __init__(self, why):
        self.why = why


class UnknownValue(Exception):
    """A word uses a value that is not known before the script runs."""

    def __init__(self, name, why):
        super().__init__(name)
        self.name = name
        self.why = why


def eval_word(word, env):
    """Return the fields of WORD after expansion with ENV (UnknownValue if unknown)."""
    if word.plain:
        return [word.raw]
    fields, cur, have = [], [], False
    for kind, value, quoted in word.parts:
        if kind == "lit":
            cur.append(value)
            have = True
            continue
        if kind == "sub":
            raise UnknownValue(value, "a command substitution")
        val = env.get(value)
        if val is None:
            raise UnknownValue(value, "not set in the script")
        if isinstance(val, Unknown):
            raise UnknownValue(value, val.why)
        if quoted:
            cur.append(val)
            have = True
            continue
        pieces = val.split()
        if val[:1].isspace() and (cur or have):
            fields.append("".join(cur))
            cur, have = [], False
        for k, piece in enumerate(pieces):
            if k:
                fields.append("".join(cur))
                cur = []
            cur.append(piece)
            have = True
        if val[-1:].isspace() and have:
            fields.append("".join(cur))
            cur, have = [], False
    if have:
        fields.append("".join(cur))
    return fields


def assignment(word):
    """Return (name, value Word) if WORD is NAME=VALUE, else None."""
    if "=" not in word.raw:
        return None
    if not word.parts or word.parts[0][0] != "lit" or word.parts[0][2]:
        return None
    raw = word.raw
    name, eq, _ = raw.partition("=")
    if not eq or not name or not (name[0].isalpha() or name[0] == "_") or \
            not name.replace("_", "a").isalnum():
        return None
    # Drop the 'NAME=' characters from the parts.
    parts, skip = [], len(name) + 1
    for kind, value, quoted in word.parts:
        if skip and kind == "lit" and not quoted:
            take = min(skip, len(value))
            value, skip = value[take:], skip - take
            if not value:
                continue
        parts.append((kind, value, quoted))
    return name, Word(raw[len(name) + 1:], parts, word.line)


def program_of(word, env):
    """Return 'ipchains', 'ipmasqadm', 'modprobe' or another name for a command word."""
    lit = word.literal()
    if lit is None:
        names = [v for k, v, _ in word.parts if k == "var"]
        try:
            fields = eval_word(word, env)
            lit = fields[0] if fields else ""
        except UnknownValue:
            for name in names:
                for prog in ("ipchains", "ipmasqadm"):
                    if prog in name.lower():
                        return prog
            return None
    return lit.rsplit("/", 1)[-1]


@dataclass
class Invocation:
    """One ipchains/ipmasqadm command found in a script."""

    argv: list
    src: SourceRef
    cmd: Cmd
    certain: bool = True
    error: Optional[str] = None


@dataclass
class Remark:
    """A diagnostic the reader found (level, src, message)."""

    level: str
    src: SourceRef
    message: str
    cmd: Optional[Cmd] = None


MODERN_MODULES = {
    "ip_masq_ftp": "nf_nat_ftp", "ip_masq_irc": "nf_nat_irc",
    "ip_masq_raudio": None, "ip_masq_quake": None, "ip_masq_cuseeme": None,
    "ip_masq_vdolive": None, "ip_masq_user": None, "ip_masq_portfw": None,
    "ip_masq_autofw": None, "ip_masq_mfw": None, "ip_masq_icq": None,
}


def module_remark(cmd, env, src):
    """Return a Remark for 'modprobe ip_masq_*', naming its modern module."""
    for word in cmd.words[1:]:
        name = word.literal()
        if name in MODERN_MODULES:
            modern = MODERN_MODULES[name]
            if modern:
                msg = ("%s is now %s (with nf_conntrack_%s); modern kernels also need "
                       "a conntrack helper rule (-t raw ... -j CT --helper %s)"
                       % (name, modern, name[8:], name[8:]))
            else:
                msg = "%s has no modern counterpart (its protocol is plain NAT now)" % name
            return Remark("note", src, msg, cmd)
    return None


class Reader:
    """Walks a parsed script; collects Invocations and Remarks in order."""

    def __init__(self, text, filename, defines=None):
        self.text = text
        self.lines = text.split("\n")
        self.file = filename
        self.defines = dict(defines or {})
        self.items = []
        self.functions = {}

    def src(self, cmd):
        text = "\n".join(self.lines[cmd.line - 1:cmd.end_line])
        return SourceRef(self.file, cmd.line, text.strip())

    # --- flat ------------------------------------------------------------------

    def flatten(self, nodes):
        """Evaluate NODES for the flat formats; return the items found."""
        env = dict(self.defines)
        self._flat(nodes, env, depth=0)
        return self.items

    def _flat(self, nodes, env, depth):
        for node in nodes:
            if isinstance(node, Cmd):
                self._flat_cmd(node, env, depth)
            elif node.kind == "func":
                self.functions[node.name] = node.body
            elif node.kind == "group":
                self._flat(node.body, env, depth)
            elif node.kind == "for":
                self._flat_for(node, env, depth)
            else:
                self._cannot(node.body, "%s at line %d" % (node.kind, node.line), env)

    def _flat_for(self, node, env, depth):
        values = []
        try:
            for word in node.words:
                values.extend(eval_word(word, env))
        except UnknownValue as exc:
            self._cannot(node.body, "for at line %d loops over %s"
                         % (node.line, _why(exc)), env)
            return
        for value in values:
            env[node.var] = value
            self._flat(node.body, env, depth)

    def _flat_cmd(self, cmd, env, depth):
        assigns = [assignment(w) for w in cmd.words] if assignment(cmd.words[0]) else [None]
        if all(assigns):
            for name, value in assigns:
                if name in self.defines:
                    continue
                try:
                    env[name] = " ".join(eval_word(value, env))
                except UnknownValue as exc:
                    env[name] = Unknown("set from %s at line %d" % (_why(exc), cmd.line))
            return
        words = cmd.words
        while words and assignment(words[0]):
            words = words[1:]
        first = words[0].literal()
        if first == "export":
            self._flat_cmd(Cmd(words[1:], [], cmd.line, cmd.end_line), env, depth)
            return
        if first in self.functions and depth < MAX_DEPTH:
            self._call(first, words[1:], env, depth)
            return
        prog = program_of(words[0], env)
        src = self.src(cmd)
        if prog in ("ipchains", "ipmasqadm"):
            try:
                argv = [prog]
                for word in words[1:]:
                    argv.extend(eval_word(word, env))
            except UnknownValue as exc:
                self.items.append(Invocation([], src, cmd, error=(
                    "%s is %s; give -D NAME=VALUE or use --to=iptables"
                    % (_shown(exc), exc.why))))
                return
            self.items.append(Invocation(argv, src, cmd))
        elif prog == "modprobe" or prog == "insmod":
            remark = module_remark(cmd, env, src)
            if remark:
                self.items.append(remark)

    def _call(self, name, args, env, depth):
        saved = {k: env.get(k) for k in [str(i) for i in range(1, 10)] + ["@", "*", "#"]}
        try:
            values = []
            for word in args:
                values.extend(eval_word(word, env))
            for i in range(1, 10):
                env[str(i)] = values[i - 1] if i <= len(values) else ""
            env["@"] = env["*"] = " ".join(values)
            env["#"] = str(len(values))
        except UnknownValue as exc:
            for i in range(1, 10):
                env[str(i)] = Unknown("an argument of %s() is %s" % (name, _why(exc)))
            env["@"] = env["*"] = env[str(1)]
        self._flat(self.functions[name], env, depth + 1)
        for key, value in saved.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value

    def _cannot(self, nodes, where, env):
        """Report every ipchains command in NODES: shell logic we cannot flatten."""
        for cmd in _walk_cmds(nodes):
            assign = assignment(cmd.words[0])
            if assign and all(assignment(w) for w in cmd.words):
                for w in cmd.words:
                    name = assignment(w)[0]
                    if name not in self.defines:
                        env[name] = Unknown("set inside %s" % where)
                continue
            if program_of(cmd.words[0], env) in ("ipchains", "ipmasqadm"):
                self.items.append(Invocation([], self.src(cmd), cmd, error=(
                    "inside shell logic that cannot be flattened (%s); give -D "
                    "NAME=VALUE for the values it decides, or use --to=iptables" % where)))

    # --- in place ----------------------------------------------------------------

    def in_place(self, nodes):
        """Return the items of NODES for the shell format (no evaluation of logic)."""
        env = dict(self.defines)
        self._place(nodes, env, certain=True)
        return self.items

    def _place(self, nodes, env, certain):
        for node in nodes:
            if isinstance(node, Block):
                self._place(node.body, env, certain=False)
                continue
            assigns = [assignment(w) for w in node.words] \
                if assignment(node.words[0]) else [None]
            if all(assigns):
                for name, value in assigns:
                    if name in self.defines:
                        continue
                    try:
                        env[name] = " ".join(eval_word(value, env)) if certain else \
                            Unknown("set inside shell logic")
                    except UnknownValue as exc:
                        env[name] = Unknown(_why(exc))
                continue
            words = node.words
            while words and assignment(words[0]):
                words = words[1:]
            prog = program_of(words[0], env)
            src = self.src(node)
            if prog in ("ipchains", "ipmasqadm"):
                # Plain words (most) are their text: no call per word for them.
                argv = [prog] + [w.raw if w._parts is None and "$" not in w.raw
                                 else _keep(w, self.defines, env) for w in words[1:]]
                error = None
                if not node.alone:
                    error = ("shares its line with other shell commands; put it on a "
                             "line of its own to translate it in place")
                self.items.append(Invocation(argv, src, node, certain, error))
            elif prog in ("modprobe", "insmod"):
                remark = module_remark(node, env, src)
                if remark:
                    self.items.append(remark)


def _keep(word, defines, env):
    """Return WORD's text for the shell format: expansions stay as written,
    unless every variable in it was given with -D.  The value the script's
    assignments give it, if known, rides along (Raw.value)."""
    lit = word.literal()
    if lit is not None:
        return lit
    if all(kind == "var" and value in defines or kind == "lit"
           for kind, value, _ in word.parts):
        fields = eval_word(word, defines)
        if len(fields) == 1:
            return fields[0]
    try:
        fields = eval_word(word, env)
    except UnknownValue:
        fields = []
    return Raw(word.raw, fields[0] if len(fields) == 1 else None)


def _shown(exc):
    """Return how the unknown value is written: $NAME or the substitution."""
    return exc.name if exc.why == "a command substitution" else "$" + exc.name


def _why(exc):
    if exc.why == "a command substitution":
        return "the command substitution %s" % exc.name
    if exc.why == "not set in the script":
        return "$%s, which the script does not set" % exc.name
    return exc.why
