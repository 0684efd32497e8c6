"""The memoized word quoting of emit_iptables (quoted(), Quoted) gives what
quoting each word on its own gives: Raw words (shell expansions, equal to and
hashed like their text) are never mixed up with plain words of the same text,
and a full memo starts afresh without changing a word."""
from translate import emit_iptables
from translate.emit_iptables import (HEREDOC_QUOTED, RESTORE_QUOTED, SHELL_QUOTED, Quoted,
                                     heredoc_word, quoted, restore_word, shell_word)
from translate.ir import Raw

MEMOS = ((SHELL_QUOTED, shell_word), (HEREDOC_QUOTED, heredoc_word),
         (RESTORE_QUOTED, restore_word))


def one_by_one(words, quote):
    return " ".join(quote(w) for w in words)


def test_raw_and_plain_words_of_one_text_are_quoted_apart():
    # sh: an unquoted $LAN expands, a single-quoted one is the four characters.
    for first, second in ((Raw("$LAN"), "$LAN"), ("$LAN", Raw("$LAN"))):
        SHELL_QUOTED.clear()
        lines = [str(emit_iptables.command("filter", ["-s", w])) for w in (first, second)]
        expected = {Raw: "iptables -s $LAN", str: "iptables -s '$LAN'"}
        assert lines == [expected[type(first)], expected[type(second)]]
        for memo, quote in MEMOS:
            memo.clear()
            for words in (["-s", first, "-j", "ACCEPT"], ["-s", second, "-j", "ACCEPT"]):
                assert quoted(words, memo) == one_by_one(words, quote)


def test_words_needing_quotes_match_the_word_by_word_quoting():
    words = ["-m", "comment", "--comment", "it's \"here\"", "", "a b", "`x`", "\\", "-j",
             "LOG", "--log-prefix", "input DENY "]
    for memo, quote in MEMOS:
        memo.clear()
        for _ in range(2):          # filled, then from the memo
            assert quoted(words, memo) == one_by_one(words, quote)


def test_a_full_memo_starts_afresh_and_still_quotes_right():
    memo = Quoted(shell_word)
    words = ["w%d" % n for n in range(100001)] + ["a b", "a b"]
    assert quoted(words, memo) == one_by_one(words, shell_word)
    assert len(memo) <= 100000
    assert memo["a b"] == "'a b'"


def test_shared_matches_keep_raw_and_plain_words_apart():
    # An interface written '$EXTIF' (single-quoted: those characters) and one
    # written $EXTIF (expanded when the script runs) are different matches.
    from translate.ir import MIface
    from translate.semantics import shared
    for first, second in (("$EXTIF", Raw("$EXTIF")), (Raw("$EXTIF"), "$EXTIF")):
        one, other = shared(MIface, "in", first, False), shared(MIface, "in", second, False)
        assert type(one.name) is type(first) and type(other.name) is type(second)
    assert shared(MIface, "in", "eth0", False) is shared(MIface, "in", "eth0", False)


def test_raw_and_plain_words_of_one_text_in_one_command():
    words = ["-s", Raw("$LAN"), "$LAN", "-d", Raw("$LAN"), "a b", Raw("$B"), "-j", "ACCEPT"]
    for memo, quote in MEMOS:
        for fresh in (True, False):     # empty memo, then filled from plain words first
            if fresh:
                memo.clear()
            else:
                quoted([w for w in words if type(w) is str], memo)
            assert quoted(words, memo) == one_by_one(words, quote)
