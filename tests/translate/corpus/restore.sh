#!/bin/sh
# args:
# Boot-time restore of an ipchains-save dump, then local additions.
if [ -f ./saved.rules ]; then
	/sbin/ipchains-restore < ./saved.rules
fi
ipchains -A input -p tcp -s 192.0.2.0/24 -d 0/0 22 -j ACCEPT
