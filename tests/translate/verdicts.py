"""Read the verdicts out of a translation: which rule, from which origin, does what.

The golden test prints the difference of these summaries when a golden file
changes, so that no regeneration changes a verdict unseen; the expectation
tests read rules of a chain with them.
"""
import difflib
import re

NFT_VERDICT = re.compile(
    r"((?:meta mark set meta mark \| \S+ )?"
    r"(?:accept|drop|return|reject with .*|goto \S+|jump \S+|masquerade.*|dnat to \S+"
    r"|redirect.*|tproxy to .*))$")
NFT_COMMENT = re.compile(r' comment "([^"]*)"$')
IPT_RULE = re.compile(r"(?:^|\s)-A (\S+) ")
IPT_COMMENT = re.compile(r"--comment ('[^']*'|\"[^\"]*\"|\S+)")
IPT_VERDICT = re.compile(r" ((?:-j|-g) .*)$")


def nft_rules(text):
    """Yield (chain, rule text without its comment, origin) for each rule of an nft file."""
    chain = None
    for line in text.split("\n"):
        stripped = line.strip()
        match = re.match(r"chain (\S+) \{$", stripped)
        if match:
            chain = match.group(1)
        elif stripped == "}":
            chain = None
        elif chain and stripped and not stripped.startswith(("#", "type ")):
            comment = NFT_COMMENT.search(stripped)
            origin = comment.group(1) if comment else ""
            body = stripped[:comment.start()] if comment else stripped
            yield chain, body, origin


def nft_verdict(body):
    """Return the verdict at the end of nft rule BODY ('continue' when it has none)."""
    match = NFT_VERDICT.search(body)
    return match.group(1) if match else "continue"


def iptables_rules(text):
    """Yield (table, chain, origin, target words) for each rule of an iptables output."""
    table = "filter"            # of the restore section (or here-document) being read
    for line in text.split("\n"):
        if line.startswith("*"):
            table = line[1:]
        if line.lstrip().startswith(("#", "ipchains-translate:", "echo ")):
            continue                # comments, and the refusal line of a partial translation
        # 'iptables -C ... 2>/dev/null || iptables -A ...' adds the rule after '||'.
        line = line.rsplit(" || ", 1)[-1]
        rule = IPT_RULE.search(line)
        if not rule:
            continue
        command = line.split(None, 1)[:1] in (["iptables"], ["ip6tables"])
        explicit = re.search(r"(?:^|\s)-t (\S+) ", line)
        comment = IPT_COMMENT.search(line)
        verdict = IPT_VERDICT.search(line[comment.end():] if comment else line)
        yield ((explicit.group(1) if explicit else "filter" if command else table), rule.group(1),
               comment.group(1).strip("'\"") if comment else "",
               verdict.group(1) if verdict else "continue")


def summary(text, fmt):
    """Return one line per rule, 'CHAIN ORIGIN -> VERDICT', of a translation in FMT."""
    if fmt == "nft":
        return ["%s %s -> %s" % (chain, origin, nft_verdict(body))
                for chain, body, origin in nft_rules(text)]
    return ["%s/%s %s -> %s" % rule for rule in iptables_rules(text)]


def diff(old_text, new_text, fmt):
    """Return the verdict lines that changed between two translations ('' when none)."""
    lines = difflib.unified_diff(summary(old_text, fmt), summary(new_text, fmt),
                                 "verdicts before", "verdicts after", lineterm="", n=0)
    return "\n".join(lines)
