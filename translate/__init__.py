"""ipchains-translate: migrate ipchains firewalls to iptables and nftables.

Data flows one way: shell.py reads scripts, ipchains.py parses each command
into the IR (ir.py), chains.py simulates the chain lists, semantics.py places
ipchains' chains into netfilter, emit_iptables.py and emit_nft.py write text;
pipeline.py strings them together and cli.py is the command line.
"""
