#!/bin/sh
# args: -D 1=start -D IPADDR=198.51.100.2
# /etc/rc.d/init.d/firewall, as the 1999 HOWTOs wrote them.
# chkconfig: 2345 08 92
[ -x /sbin/ipchains ] || exit 0
. ./firewall.conf

IPADDR=`ifconfig $EXTIF | grep 'inet addr' | sed 's/.*addr:\([0-9.]*\).*/\1/'`
[ -z "$IPADDR" ] && IPADDR="my.ip.address"
IPCHAINS=/sbin/ipchains

allow_tcp() {
	for port in "$@"; do
		$IPCHAINS -A input -p tcp -d $IPADDR $port \
			-j ACCEPT
	done
}

start() {
	echo -n "Starting firewall: "
	$IPCHAINS -F
	$IPCHAINS -X
	$IPCHAINS -P input DENY
	$IPCHAINS -P output ACCEPT
	$IPCHAINS -P forward DENY
	$IPCHAINS -A input -i lo -j ACCEPT
	$IPCHAINS -A input -i $EXTIF -s $LAN -j DENY -l
	allow_tcp 22 25 80
	if [ "$DNS" = yes ]; then
		$IPCHAINS -A input -p udp -s 0/0 53 -d $IPADDR 1024:65535 -j ACCEPT
	fi
	if [ -n "$BLOCKED" ]; then
		$IPCHAINS -A input -s $BLOCKED -j DENY
	fi
	$IPCHAINS -A input -p tcp -d $IPADDR 1024:65535 ! -y -j ACCEPT
	$IPCHAINS -A forward -s $LAN -j MASQ
	echo 1 > /proc/sys/net/ipv4/ip_forward
	echo "done"
}

stop() {
	$IPCHAINS -F
	$IPCHAINS -P input ACCEPT
	$IPCHAINS -P forward ACCEPT
}

case "$1" in
  start)
	start
	;;
  stop)
	stop
	;;
  status)
	$IPCHAINS -L -n
	;;
  restart)
	stop
	start
	;;
  *)
	echo "Usage: firewall {start|stop|status|restart}"
	exit 1
esac
exit 0
