"""What Linux 2.2 did with each ipchains target in each place a packet meets it.

Hand-written from the Linux 2.2.1 sources (and, for portfw -d without -R,
the scripts that relied on it), never from the translator's output; the tests check the
translator (test_xlate_expectations.py) and every golden file against it.
Line numbers are those of linux-2.2.1 (the tree in github:linas/i370-linux-2.2.1,
commit fde10a93613d44f41a00f3764cdf8e85af5b355c, whose net/ and include/ are
the stock 2.2.1 ones).

A packet met ipchains' chains in these places, which the translator names
as contexts (the prefix of the netfilter chain holding that copy of a chain):

  in   local input: ip_rcv ran the input chain on every arriving packet
       (ip_input.c:510), then delivered it here (ip_input.c:535).
  rd   local input of a REDIRECTed packet: the same input chain, which had
       decided the redirect by the packet's own (original) destination
       (ip_input.c:510-518).
  mr   a reply of a masqueraded connection: ip_rcv ran the input chain on it
       as it arrived, addressed to the masquerading address and port
       (ip_input.c:510); ip_local_deliver de-masqueraded it
       (ip_input.c:256-271), marked it IPSKB_MASQUERADED and forwarded it;
       ip_forward skipped the forward chain for such packets
       (ip_forward.c:164-208) and ran the output chain (ip_forward.c:246).
  pf   a port-forwarded packet (ipmasqadm portfw): ip_rcv ran the input chain
       on it as it arrived, addressed to the forward's local address and
       port (ip_input.c:510); ip_local_deliver de-masqueraded it, which
       created the connection (ip_masq_portfw.c:400-455 portfw_in_create),
       and forwarded it past the forward chain to the output chain, as for mr.
  fi   a forwarded packet at its first stage: the input chain (ip_input.c:510).
  fw   a forwarded packet at its second stage: the forward chain
       (ip_forward.c:198).
  fo   a forwarded packet at its third stage: the output chain
       (ip_forward.c:246).
  om   a masqueraded packet at its third stage: ip_forward masqueraded it
       (ip_forward.c:220-236) before the output chain (ip_forward.c:246).
  out  a local packet: the output chain in ip_output.c (ip_build_and_send_pkt
       :135, ip_queue_xmit :295, ip_build_xmit_slow :562, ip_build_xmit :689).
  pre  not a place of its own on 2.2: the translator's copy of the input
       chain in PREROUTING that decides REDIRECT before routing.
"""
from collections import namedtuple

SRC = "linux-2.2.1 "

# What a target does in a context: the verdict 2.2 gave, the nft and the
# iptables form of it, and where that comes from.  The netfilter forms
# follow from the verdicts: ACCEPT in an early stage of a forwarded packet
# must go on to the next stage, so it is a goto into that stage.
Expect = namedtuple("Expect", "target context verdict nft iptables cite")

ON_TO_FORWARD = ("goto stage-fw", "-g stage-fw")
ON_TO_OUTPUT = ("goto stage-out", "-g stage-out")
ON_TO_MASQ_OUTPUT = ("meta mark set meta mark | 0x40000000 goto stage-om", "-g stage-om")
PORT_UNREACH = ("reject with icmp type port-unreachable",
                "-j REJECT --reject-with icmp-port-unreachable")
HOST_UNREACH = ("reject with icmp type host-unreachable",
                "-j REJECT --reject-with icmp-host-unreachable")
DROP = ("drop", "-j DROP")
ACCEPT = ("accept", "-j ACCEPT")

_INPUT = SRC + "net/ipv4/ip_input.c:510-513 (ip_rcv: call_in_firewall; FW_REJECT -> ICMP_PORT_UNREACH)"
_FORWARD = SRC + "net/ipv4/ip_forward.c:198-208 (call_fw_firewall; FW_REJECT -> ICMP_HOST_UNREACH)"
_FWD_OUT = SRC + "net/ipv4/ip_forward.c:246-253 (call_out_firewall; FW_REJECT -> ICMP_HOST_UNREACH)"
_LOCAL_OUT = (SRC + "net/ipv4/ip_output.c:135,295 (call_out_firewall < FW_ACCEPT: drop), "
              ":562-567,:689-696 (-EPERM to the sender); no icmp_send on output")
_DEMASQ = (SRC + "net/ipv4/ip_input.c:256-271 (ip_local_deliver de-masquerades after "
           "ip_rcv's input chain) and net/ipv4/ip_forward.c:164,220 (IPSKB_MASQUERADED "
           "skips the forward chain)")
_MASQ = (SRC + "net/ipv4/ip_forward.c:198-236 (FW_MASQUERADE: ip_fw_masquerade, then the "
         "output chain at :246)")
_REDIR = (SRC + "net/ipv4/ip_input.c:517-518 (FW_REDIRECT: ip_local_deliver) and "
          "net/ipv4/ip_fw.c:784-793 (port 0 keeps the destination port)")
_DELIVER = SRC + "net/ipv4/ip_input.c:510,535 (input chain passes: skb->dst->input delivers)"
# MASQ and REDIRECT outside the chains they belong to: the 2.2 kernel did not
# refuse them, it gave them a verdict that is not what the rule says, so the
# translator refuses them with a located error (fail closed).
_MASQ_ELSEWHERE = (SRC + "include/linux/firewall.h:12,15 (FW_MASQUERADE 4 >= FW_ACCEPT 2) and "
                   "net/ipv4/ip_input.c:510, ip_output.c:135 (only < FW_ACCEPT stops a "
                   "packet): let through, not masqueraded; ip_forward.c:220 alone masquerades")
_REDIRECT_ELSEWHERE = (SRC + "net/ipv4/ip_forward.c:198-208 (FW_REDIRECT falls to default: "
                       "dropped) and net/ipv4/ip_output.c:135 (FW_REDIRECT 3 >= FW_ACCEPT: "
                       "sent on); only ip_input.c:517 redirects")

TARGETS = [
    # ACCEPT: the packet goes on (ip_fw.c:750-753 returns the target's verdict).
    Expect("ACCEPT", "in", "delivered locally", *ACCEPT, cite=_DELIVER),
    Expect("ACCEPT", "rd", "delivered locally", *ACCEPT, cite=_DELIVER),
    Expect("ACCEPT", "mr", "on to the output chain (forward skipped)", *ON_TO_OUTPUT, cite=_DEMASQ),
    Expect("ACCEPT", "pf", "on to the output chain (forward skipped)", *ON_TO_OUTPUT,
           cite=_DEMASQ + "; " + SRC + "net/ipv4/ip_masq_portfw.c:400-455"),
    Expect("ACCEPT", "fi", "on to the forward chain", *ON_TO_FORWARD,
           cite=SRC + "net/ipv4/ip_input.c:535 (skb->dst->input is ip_forward)"),
    Expect("ACCEPT", "fw", "on to the output chain", *ON_TO_OUTPUT, cite=_FORWARD),
    Expect("ACCEPT", "fo", "sent", *ACCEPT, cite=_FWD_OUT),
    Expect("ACCEPT", "om", "sent", *ACCEPT, cite=_FWD_OUT),
    Expect("ACCEPT", "out", "sent", *ACCEPT, cite=_LOCAL_OUT),
    # DENY: FW_BLOCK, dropped without a word everywhere.
    Expect("DENY", "in", "dropped", *DROP, cite=_INPUT),
    Expect("DENY", "rd", "dropped", *DROP, cite=_INPUT),
    Expect("DENY", "mr", "dropped", *DROP, cite=_INPUT),
    Expect("DENY", "pf", "dropped", *DROP, cite=_INPUT),
    Expect("DENY", "fi", "dropped", *DROP, cite=_INPUT),
    Expect("DENY", "fw", "dropped", *DROP, cite=_FORWARD),
    Expect("DENY", "fo", "dropped", *DROP, cite=_FWD_OUT),
    Expect("DENY", "om", "dropped", *DROP, cite=_FWD_OUT),
    Expect("DENY", "out", "dropped", *DROP, cite=_LOCAL_OUT),
    # REJECT: which ICMP depends on where the chain ran, not on the chain.
    Expect("REJECT", "in", "ICMP port unreachable", *PORT_UNREACH, cite=_INPUT),
    Expect("REJECT", "rd", "ICMP port unreachable", *PORT_UNREACH, cite=_INPUT),
    Expect("REJECT", "mr", "ICMP port unreachable", *PORT_UNREACH, cite=_INPUT),
    Expect("REJECT", "pf", "ICMP port unreachable", *PORT_UNREACH, cite=_INPUT),
    Expect("REJECT", "fi", "ICMP port unreachable", *PORT_UNREACH, cite=_INPUT),
    Expect("REJECT", "fw", "ICMP host unreachable", *HOST_UNREACH, cite=_FORWARD),
    Expect("REJECT", "fo", "ICMP host unreachable", *HOST_UNREACH, cite=_FWD_OUT),
    # The ICMP was built from the masqueraded packet, so it went to the
    # masquerading address itself, whose de-masquerading of ICMP errors
    # (ip_masq.c:1660-1669, ip_fw_demasq_icmp) handed it to the inside client:
    # netfilter rejects before masquerading, to the client directly.
    Expect("REJECT", "om", "ICMP host unreachable (to the inside client)", *HOST_UNREACH,
           cite=_FWD_OUT + "; " + SRC + "net/ipv4/icmp.c:570-584 and ip_masq.c:1660-1669"),
    Expect("REJECT", "out", "dropped, no ICMP (the send fails)", *DROP, cite=_LOCAL_OUT),
    # MASQ: forward only; masqueraded, then the output chain.
    Expect("MASQ", "fw", "masqueraded, on to the output chain", *ON_TO_MASQ_OUTPUT, cite=_MASQ),
    Expect("MASQ", "in", "let through, not masqueraded: refused", None, None,
           cite=_MASQ_ELSEWHERE),
    Expect("MASQ", "fi", "let through, not masqueraded: refused", None, None,
           cite=_MASQ_ELSEWHERE),
    Expect("MASQ", "out", "let through, not masqueraded: refused", None, None,
           cite=_MASQ_ELSEWHERE),
    # REDIRECT: input only; delivered locally to the port (0: the same port).
    Expect("REDIRECT", "in", "delivered locally", *ACCEPT, cite=_REDIR),
    Expect("REDIRECT", "rd", "delivered locally", *ACCEPT, cite=_REDIR),
    Expect("REDIRECT", "mr", "on to the output chain (de-masqueraded before any socket)",
           *ON_TO_OUTPUT, cite=_REDIR + "; " + _DEMASQ),
    Expect("REDIRECT", "fw", "dropped, not redirected: refused", None, None,
           cite=_REDIRECT_ELSEWHERE),
    Expect("REDIRECT", "out", "sent on, not redirected: refused", None, None,
           cite=_REDIRECT_ELSEWHERE),
    # RETURN: back to the caller; from a built-in chain, its policy.
    Expect("RETURN", "in", "back to the caller, or the policy", "return", "-j RETURN",
           cite=SRC + "net/ipv4/ip_fw.c:484-487,746-766 (RETURN is FW_SKIP+1: fall_off_chain)"),
    Expect("RETURN", "fw", "back to the caller, or the policy", "return", "-j RETURN",
           cite=SRC + "net/ipv4/ip_fw.c:484-487,746-766 (RETURN is FW_SKIP+1: fall_off_chain)"),
    Expect("RETURN", "out", "back to the caller, or the policy", "return", "-j RETURN",
           cite=SRC + "net/ipv4/ip_fw.c:484-487,746-766 (RETURN is FW_SKIP+1: fall_off_chain)"),
]

# A policy is a target met at the end of a built-in chain (ip_fw.c:764,
# ret = chain->policy), so it gives the verdicts above; it lives in the
# context's one-rule policy chain.
POLICY_CHAINS = {"in": "pol-input", "rd": "pol-input", "mr": "pol-mr-input",
                 "pf": "pol-pf-input",
                 "fi": "pol-fi-input", "fw": "pol-forward", "out": "pol-output",
                 "fo": "pol-fo-output", "om": "pol-fo-output"}
POLICY_CITE = SRC + "net/ipv4/ip_fw.c:756-766 (falling off a built-in chain: ret = chain->policy)"


def expect(target, context):
    """Return the Expect row for TARGET in CONTEXT, or None when the table has none."""
    for row in TARGETS:
        if row.target == target and row.context == context:
            return row
    return None


# Whole examples: ipchains commands, the netfilter chain a rule lands in,
# the whole nft rule expected there (without its comment) and the verdict
# 2.2 gave a packet the rule matches.
Example = namedtuple("Example", "name commands chain nft verdict cite")

EXAMPLES = [
    Example("input ACCEPT, local", ["-A input -p tcp -d 192.0.2.1 22 -j ACCEPT"], "in-input",
            "meta l4proto tcp ip daddr 192.0.2.1 tcp dport 22 accept", "delivered locally",
            _INPUT),
    Example("input ACCEPT, forwarded", ["-A input -s 192.0.2.0/24 -j ACCEPT"], "fi-input",
            "ip saddr 192.0.2.0/24 goto stage-fw", "on to the forward chain", _INPUT),
    Example("input -i is the arriving interface", ["-A input -i eth1 -j DENY"], "fi-input",
            'iifname "eth1" drop', "dropped",
            SRC + "net/ipv4/ip_fw.c:1653-1657 (ipfw_input_check: the receiving device)"),
    Example("forward -i is the leaving interface", ["-A forward -i eth0 -j ACCEPT"],
            "fw-forward", 'oifname "eth0" goto stage-out', "on to the output chain",
            SRC + "net/ipv4/ip_forward.c:198 (call_fw_firewall(PF_INET, dev2 = the output device))"),
    Example("input REJECT, local", ["-A input -p tcp -d 192.0.2.1 113 -j REJECT"], "in-input",
            "meta l4proto tcp ip daddr 192.0.2.1 tcp dport 113 " + PORT_UNREACH[0],
            "ICMP port unreachable", _INPUT),
    Example("input REJECT, forwarded", ["-A input -p udp -d 203.0.113.0/24 -j REJECT"],
            "fi-input", "meta l4proto udp ip daddr 203.0.113.0/24 " + PORT_UNREACH[0],
            "ICMP port unreachable", _INPUT),
    Example("forward REJECT", ["-A forward -p tcp -d 203.0.113.0/24 25 -j REJECT"], "fw-forward",
            "meta l4proto tcp ip daddr 203.0.113.0/24 tcp dport 25 " + HOST_UNREACH[0],
            "ICMP host unreachable", _FORWARD),
    Example("output REJECT, forwarded", ["-A output -d 203.0.113.9 -j REJECT"], "fo-output",
            "ip daddr 203.0.113.9 " + HOST_UNREACH[0], "ICMP host unreachable", _FWD_OUT),
    Example("output REJECT, local", ["-A output -d 203.0.113.9 -j REJECT"], "out-output",
            "ip daddr 203.0.113.9 drop", "dropped, no ICMP (the send fails)", _LOCAL_OUT),
    Example("REJECT policy of forward", ["-P forward REJECT"], "pol-forward",
            HOST_UNREACH[0], "ICMP host unreachable", _FORWARD + "; " + POLICY_CITE),
    Example("REJECT policy of input", ["-P input REJECT"], "pol-fi-input",
            PORT_UNREACH[0], "ICMP port unreachable", _INPUT + "; " + POLICY_CITE),
    Example("REJECT policy of output, local", ["-P output REJECT"], "pol-output",
            "drop", "dropped, no ICMP (the send fails)", _LOCAL_OUT + "; " + POLICY_CITE),
    Example("DENY policy of input", ["-P input DENY"], "pol-input", "drop", "dropped",
            _INPUT + "; " + POLICY_CITE),
    Example("MASQ in forward", ["-A forward -s 192.0.2.0/24 -j MASQ"], "fw-forward",
            "ip saddr 192.0.2.0/24 " + ON_TO_MASQ_OUTPUT[0],
            "masqueraded, on to the output chain", _MASQ),
    Example("MASQ policy", ["-P forward MASQ"], "pol-forward", ON_TO_MASQ_OUTPUT[0],
            "masqueraded, on to the output chain", _MASQ + "; " + POLICY_CITE),
    Example("masquerading uses 2.2's ports", ["-P forward MASQ"], "nat-POSTROUTING",
            "meta l4proto tcp meta mark & 0x40000000 == 0x40000000 "
            "ct mark set ct mark | 0x40000000 masquerade to :61000-65095",
            "masqueraded from ports 61000-65095",
            SRC + "include/net/ip_masq.h:27-28 (PORT_MASQ_BEGIN 61000, END +4096) and "
            "net/ipv4/ip_masq.c:794-805 (get_next_mport)"),
    Example("masqueraded replies meet input by their arriving addresses",
            ["-P forward MASQ", "-A input -p tcp -d 198.51.100.1 61000:65095 -j DENY"],
            "mr-input",
            "meta l4proto tcp ct reply ip daddr 198.51.100.1 ct reply proto-dst 61000-65095 drop",
            "dropped", _INPUT + "; " + _DEMASQ),
    Example("masqueraded replies: input ACCEPT goes on to output",
            ["-P forward MASQ", "-A input -s 203.0.113.0/24 -j ACCEPT"], "mr-input",
            "ip saddr 203.0.113.0/24 goto stage-out", "on to the output chain (forward skipped)",
            _DEMASQ),
    Example("masqueraded replies are sent to the input stage", ["-P forward MASQ"], "FORWARD",
            "ct status snat ct direction reply ct mark & 0x40000000 == 0x40000000 jump mr-input",
            "the input chain by their arriving addresses", _INPUT + "; " + _DEMASQ),
    Example("port-forwarded packets are sent to the input stage",
            ["ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080"], "FORWARD",
            "ct status dnat ct direction original ct mark & 0x20000000 == 0x20000000 jump pf-input",
            "the input chain by the address they arrived for",
            _INPUT + "; " + _DEMASQ + "; " + SRC + "net/ipv4/ip_masq_portfw.c:400-455"),
    Example("port-forwarded packets skip forward",
            ["ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080"], "FORWARD",
            "ct status dnat ct direction original ct mark & 0x20000000 == 0x20000000 "
            "jump pol-pf-input",
            "input policy, then output; never the forward chain", _DEMASQ),
    Example("masqueraded replies skip forward", ["-P forward MASQ"], "FORWARD",
            "ct status snat ct direction reply ct mark & 0x40000000 == 0x40000000 "
            "jump pol-mr-input",
            "input policy, then output; never the forward chain", _DEMASQ),
    Example("port-forwarded packets meet input by the address they arrived for",
            ["ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080",
             "-A input -p tcp -d 198.51.100.1 80 -j ACCEPT"], "pf-input",
            "meta l4proto tcp ct original ip daddr 198.51.100.1 ct original proto-dst 80 "
            "goto stage-out", "on to the output chain (forward skipped)",
            _INPUT + "; " + _DEMASQ + "; " + SRC + "net/ipv4/ip_masq_portfw.c:400-455"),
    Example("port forwards only of this host's addresses",
            ["ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080"], "portfw",
            "meta l4proto tcp ip daddr 198.51.100.1 tcp dport 80 fib daddr type local "
            "ct mark set ct mark | 0x20000000 dnat to 192.0.2.80:8080",
            "forwarded to 192.0.2.80:8080 when 198.51.100.1 is the router's",
            SRC + "net/ipv4/ip_input.c:256-271 (ip_fw_demasquerade only in ip_local_deliver) "
            "and net/ipv4/ip_masq_portfw.c:400-455 (looked up by the local daddr)"),
    Example("REDIRECT decided before routing", ["-A input -p tcp -d 203.0.113.80 80 -j REDIRECT 3128"],
            "pre-input",
            "meta l4proto tcp ip daddr 203.0.113.80 tcp dport 80 redirect to :3128",
            "delivered locally to port 3128", _REDIR),
    Example("REDIRECT port 0 keeps the port", ["-A input -p tcp -d 203.0.113.80 80 -j REDIRECT 0"],
            "pre-input", "meta l4proto tcp ip daddr 203.0.113.80 tcp dport 80 redirect",
            "delivered locally to port 80", _REDIR),
    Example("redirected packets judged by their original destination",
            ["-A input -p tcp -d 203.0.113.80 80 -j REDIRECT 3128"], "rd-input",
            "meta l4proto tcp ct original ip daddr 203.0.113.80 ct original proto-dst 80 accept",
            "delivered locally", _REDIR),
    Example("user chain: jump", ["-N svc", "-A svc -p tcp --dport 22 -j ACCEPT", "-A input -j svc"],
            "in-input", "jump in-svc", "the user chain, then the rest of input",
            SRC + "net/ipv4/ip_fw.c:716-741 (f->branch: prevchain/prevrule kept)"),
    Example("user chain gets its caller's context",
            ["-N svc", "-A svc -p tcp --dport 22 -j ACCEPT", "-A input -j svc"],
            "fi-svc", "meta l4proto tcp tcp dport 22 goto stage-fw", "on to the forward chain",
            SRC + "net/ipv4/ip_fw.c:716-741 (the called chain runs in the caller's check)"),
    Example("RETURN from a user chain", ["-N u", "-A u -s 192.0.2.9 -j RETURN", "-A u -j DENY",
                                         "-A input -j u"], "in-u", "ip saddr 192.0.2.9 return",
            "back to the caller", SRC + "net/ipv4/ip_fw.c:746-762"),
    Example("RETURN from a built-in chain: its policy",
            ["-P input DENY", "-A input -s 192.0.2.9 -j RETURN"], "in-input",
            "ip saddr 192.0.2.9 return", "the input policy (DENY)",
            SRC + "net/ipv4/ip_fw.c:756-766 (no prevchain: ret = chain->policy)"),
]

# The output chain met a masqueraded packet after ip_fw_masquerade gave it
# one of the masquerading ports (ip_forward.c:220-246; ip_masq.c:794-805,
# include/net/ip_masq.h:27-28), so a TCP or UDP source port test there was
# decided by that range: always true, never true, or (a range that cuts it)
# not known before netfilter masquerades, after the filter rules: refused.
# (source port spec, what the om-output chain holds for the rule: its nft
# body, None for no rule, "untranslated" for a warning and no rule).
OmPort = namedtuple("OmPort", "ports om_rule cite")
_OM = SRC + "net/ipv4/ip_forward.c:220-246 and include/net/ip_masq.h:27-28"
OM_PORTS = [
    OmPort("61000:65095", "meta l4proto tcp drop", _OM),
    OmPort("1024:65535", "meta l4proto tcp drop", _OM),
    OmPort("1024:60999", None, _OM),
    OmPort("! 61000:65095", None, _OM),
    OmPort("! 1024:60999", "meta l4proto tcp drop", _OM),
    OmPort("60000:61000", "untranslated", _OM),
]

# ipmasqadm portfw: the forwards left after a sequence of commands, as
# (proto, local address, local port, remote address, remote port).
PortfwExample = namedtuple("PortfwExample", "name commands remaining status cite")
_PORTFW = SRC + "net/ipv4/ip_masq_portfw.c"
PORTFW = [
    PortfwExample("add", ["-a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080"],
                  [("tcp", "198.51.100.1", 80, "192.0.2.80", 8080)], 0,
                  _PORTFW + ":197-235 (ip_portfw_add)"),
    PortfwExample("delete what -a added",
                  ["-a -P tcp -L 198.51.100.1 25 -R 192.0.2.25 25",
                   "-d -P tcp -L 198.51.100.1 25 -R 192.0.2.25 25"], [], 0,
                  _PORTFW + ":72-98 (ip_portfw_del)"),
    PortfwExample("delete without -R removes every forward of the local end",
                  ["-a -P udp -L 198.51.100.1 53 -R 192.0.2.53 53",
                   "-a -P udp -L 198.51.100.1 53 -R 192.0.2.54 53",
                   "-a -P tcp -L 198.51.100.1 53 -R 192.0.2.53 53",
                   "-d -P udp -L 198.51.100.1 53"],
                  [("tcp", "198.51.100.1", 53, "192.0.2.53", 53)], 0,
                  _PORTFW + ":86-89 (0 raddr/rport match any; protocol lists apart, :59-62)"),
    PortfwExample("delete of a forward not there fails",
                  ["-a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080",
                   "-d -P tcp -L 198.51.100.1 80 -R 192.0.2.81 8080"],
                  [("tcp", "198.51.100.1", 80, "192.0.2.80", 8080)], 1,
                  _PORTFW + ":98 (ESRCH when nothing was removed)"),
    PortfwExample("flush", ["-a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080", "-f",
                            "-a -P tcp -L 198.51.100.1 81 -R 192.0.2.80 81"],
                  [("tcp", "198.51.100.1", 81, "192.0.2.80", 81)], 0,
                  _PORTFW + ":105-123 (ip_portfw_flush)"),
    PortfwExample("add a second forward of one local end (2.2 shared the connections; "
                  "a note says netfilter takes the first)",
                  ["-a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080",
                   "-a -P tcp -L 198.51.100.1 80 -R 192.0.2.81 8080"],
                  [("tcp", "198.51.100.1", 80, "192.0.2.80", 8080),
                   ("tcp", "198.51.100.1", 80, "192.0.2.81", 8080)], 0,
                  _PORTFW + ":400-455 (portfw_in_create rotates forwards by pref_cnt)"),
    PortfwExample("adding the same forward twice keeps one",
                  ["-a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080",
                   "-a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080"],
                  [("tcp", "198.51.100.1", 80, "192.0.2.80", 8080)], 0,
                  _PORTFW + ":162-191,205-210 (ip_portfw_edit finds it: no new entry)"),
]


def portfw_deletes(delete, entry):
    """True when 'portfw -d' fields DELETE remove forward ENTRY (ip_masq_portfw.c:86-89)."""
    proto, laddr, lport, raddr, rport = delete
    return (proto == entry[0] and lport == entry[2] and (not laddr or laddr == entry[1])
            and (not raddr or raddr == entry[3]) and (not rport or rport == entry[4]))
