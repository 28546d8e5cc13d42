#!/bin/sh
# PID 1 of the test VM (busybox sh). Lines starting with CT- are the protocol that
# `cargo xtask vm-test` parses on the host; ct-scenarios prints `CT-RESULT <name> ok`,
# `CT-PLAN <n>` (how many results will follow), `CT-RESULT <name> FAILED <reason>` and
# finally `CT-DONE`.
# Guest layout (xtask/src/initramfs.rs): /bin/conntrack-trace, /bin/ct-scenarios, busybox
# applets in /bin; the real iproute2 /usr/sbin/ip and /usr/sbin/tc, /usr/bin/ss,
# /usr/sbin/{conntrack,nft}, /usr/sbin/iptables* (legacy) and /usr/sbin/iptables-nft*.
# busybox sh runs its own applets (ip, tc) before any PATH lookup: from shell, call iproute2
# by full path. Environment for ct-scenarios: CT_KERNEL (matrix name), CT_MODE, CT_TRACER.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf

# The host passes the kernel's matrix name and the mode on the command line.
CT_KERNEL=unknown
CT_MODE=test
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ct.kernel=*) CT_KERNEL=${arg#ct.kernel=} ;;
        ct.mode=*) CT_MODE=${arg#ct.mode=} ;;
        ct.scenarios=*) CT_SCENARIOS=$(echo "${arg#ct.scenarios=}" | tr , ' ') ;;
    esac
done
export CT_KERNEL CT_MODE CT_TRACER=/bin/conntrack-trace
echo "CT-BOOTED $CT_KERNEL $(uname -r)"

# xtask wrote the modules in dependency order.
failed=
while read -r m; do
    insmod "/lib/modules/$m.ko" || failed="$failed $m"
done < /lib/modules/load-order
if [ -z "$failed" ]; then
    echo "CT-RESULT modules ok"
else
    echo "CT-RESULT modules FAILED insmod failed for:$failed"
fi

/bin/conntrack-trace check
rc=$?
if [ "$rc" = 0 ]; then
    echo "CT-RESULT check ok"
else
    echo "CT-RESULT check FAILED conntrack-trace check exited with status $rc"
fi

case "$CT_MODE" in
    demo) /bin/ct-scenarios demo ;;
    bench) /bin/ct-scenarios bench ;;
    # shellcheck disable=SC2086 # one word per scenario name
    *) /bin/ct-scenarios $CT_SCENARIOS ;;
esac
echo "CT-SCENARIOS-EXIT $?"
poweroff -f
