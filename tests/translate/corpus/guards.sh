#!/bin/bash
# args:
# Guards, arithmetic, a while loop over a here-document, an early exit.
TRUSTED=
DEBUG=0
MAXPORT=$((1024 * 64 - 1))
[ -n "$TRUSTED" ] && ipchains -A input -s $TRUSTED -j ACCEPT
[ -z "$TRUSTED" ] || ipchains -A input -s 203.0.113.99 -j ACCEPT
[ "$DEBUG" -eq 0 ] || ipchains -A input -j ACCEPT -l
ipchains -A input -p tcp -d 0/0 1024:$MAXPORT ! -y -j ACCEPT
while read net why; do
	ipchains -A input -s $net -j DENY
done <<HOSTS
203.0.113.0/28 spam
198.51.100.128/25 scans
HOSTS
if ipchains -L input -n >/dev/null 2>&1; then
	ipchains -A input -p icmp -j ACCEPT
else
	ipchains -A input -p icmp -j DENY
fi
count=0
until [ $count -ge 2 ]; do
	ipchains -A output -p udp -d 192.0.2.$((count + 1)) 514 -j ACCEPT
	count=$((count + 1))
done
exit 0
ipchains -A input -j ACCEPT
