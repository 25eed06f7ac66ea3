#!/bin/busybox sh
# /init of the guest that `cargo xtask test --kernel` boots (see
# xtask/src/vm/mod.rs): mounts what the suite needs, runs every test binary
# as root with CI=true, prints the marker line the host waits for, powers
# off. Its output is the serial console, which the host echoes.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp CI=true RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/netns
for ko in /lib/modules/*.ko; do
    [ -e "$ko" ] && insmod "$ko"
done
ip link set lo up
# TESTS (file names under deps/), FILTER and the suite's environment.
. /etc/redirect-vm.env
echo "redirect-vm: kernel $(uname -r), $(nproc) CPUs, $(free -m | awk '/Mem:/ {print $2}') MiB"
cd /redirect
rc=0
for t in $TESTS; do
    start=$(date +%s)
    echo "redirect-vm: running $t"
    ./target/debug/deps/$t ${FILTER:+"$FILTER"} || rc=1
    echo "redirect-vm: $t took $(($(date +%s) - start)) s"
done
echo "REDIRECT-VM-EXIT=$rc"
poweroff -f
