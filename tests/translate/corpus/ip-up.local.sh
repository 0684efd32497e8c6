#!/bin/sh
# args: -D 1=ppp0 -D 2=/dev/ttyS1 -D 3=38400 -D 4=198.51.100.7 -D 5=198.51.100.1
# /etc/ppp/ip-up.local: pppd runs it as  ip-up IFACE TTY SPEED LOCAL REMOTE
IFACE=$1
LOCAL=$4
REMOTE=$5
ANY=0.0.0.0/0

ipchains -F input
ipchains -P input DENY
ipchains -A input -i $IFACE -s $REMOTE -j ACCEPT
ipchains -A input -i $IFACE -p tcp -d $LOCAL 1024:65535 ! -y -j ACCEPT
ipchains -A input -i $IFACE -p udp -s $ANY 53 -d $LOCAL -j ACCEPT
ipchains -A input -i $IFACE -p icmp --icmp-type echo-reply -d $LOCAL -j ACCEPT
ipchains -A input -i ! $IFACE -j ACCEPT
[ "$3" -gt 57600 ] && ipchains -A input -i $IFACE -p tcp -d $LOCAL 6000:6010 -j DENY
[ "$3" -le 57600 ] && ipchains -A input -i $IFACE -p tcp -d $LOCAL 6000:6063 -j DENY
ipchains -A input -j DENY -l
