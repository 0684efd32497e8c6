#!/bin/sh
# args: -D EXTIP=198.51.100.2
# A masquerading gateway with port forwards, after the IP-Masquerade HOWTO.
EXTIP="your.ip.here"
INTIF=eth1
SERVER=192.0.2.10
/sbin/depmod -a
/sbin/modprobe ip_masq_ftp
/sbin/modprobe ip_masq_portfw
ipchains -P forward DENY
ipchains -A forward -s 192.0.2.0/24 -j MASQ
ipmasqadm portfw -f
for port in 80 443 25; do
	ipmasqadm portfw -a -P tcp -L $EXTIP $port -R $SERVER $port
done
for svc in domain:53; do
	ipmasqadm portfw -a -P udp -L $EXTIP ${svc#*:} -R $SERVER ${svc#*:}
done
