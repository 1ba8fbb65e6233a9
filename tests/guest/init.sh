#!/bin/busybox sh
# /init of blkgraph's test guest: run the jobs named on the kernel command
# line against the virtio disk, report on the second serial port, power off.
#
# Kernel parameters:
#   bg.job=JOB[,JOB...]  jobs to run in order (default: none)
#       fio-verify  fio randwrite + crc32c verify over bg.size, one section
#                   per block size in bg.bs, then the md5 job
#       fio-bench   fio randread for bg.runtime seconds (group_reporting)
#       fio         the fio job file passed as fw_cfg opt/blkgraph/fio
#                   (the disk is ${DISK} in it)
#       md5         md5 of the first bg.size bytes of the disk (O_DIRECT)
#       resize-wait print "== resize-wait", wait up to 60 s for the disk's
#                   size to change, then write and read back its last MiB;
#                   the result has before=SECTORS and after=SECTORS lines
#       none        nothing: boot and power off
#   bg.size=N[kmg]   region for fio-verify and md5 (default 64M); fio-bench:
#                    whole disk unless given
#   bg.bs=4k,64k     block sizes (fio-bench default 4k)
#   bg.iodepth=N     default 16 (fio-verify), 32 (fio-bench)
#   bg.numjobs=N     fio processes per section, spread over the CPUs (1)
#   bg.runtime=S     fio-bench seconds (10); bg.ramp=S fio-bench ramp (1)
#   bg.ioengine=E    default libaio
# Each result on /dev/ttyS1 is framed by the lines
#   @@blkgraph-begin NAME
#   @@blkgraph-end NAME rc=RC
# Besides the jobs' results (fio-verify, fio-bench, fio: fio's JSON; md5: the
# hash) there are "disk" (queues, sectors, logical_block_size, cpus as KEY=N
# lines, before the jobs) and "interrupts" (reqN=interrupts of request queue
# N, after them).  The run ends with the line "@@blkgraph-done".

/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
set -o pipefail

p_job=none p_size= p_bs= p_iodepth= p_numjobs=1 p_runtime=10 p_ramp=1 p_ioengine=libaio
for word in $(cat /proc/cmdline); do
	case "$word" in
	bg.*=*)
		key=${word%%=*}
		key=${key#bg.}
		case "$key" in '' | *[!a-z_]*) continue ;; esac
		eval "p_$key=\${word#*=}"
		;;
	esac
done

RESULTS=/dev/ttyS1
stty -F "$RESULTS" raw -echo 2>/dev/null
export DISK=/dev/vda
NCPU=$(nproc)

# emit NAME RC FILE: send FILE to the host as result NAME.
emit() {
	{
		echo "@@blkgraph-begin $1"
		cat "$3"
		echo
		echo "@@blkgraph-end $1 rc=$2"
	} >"$RESULTS"
}

# bytes N[kKmMgG]: print N in bytes.
bytes() {
	case "$1" in
	*[kK]) echo $((${1%?} << 10)) ;;
	*[mM]) echo $((${1%?} << 20)) ;;
	*[gG]) echo $((${1%?} << 30)) ;;
	*) echo $(($1)) ;;
	esac
}

# fio_global IODEPTH: print the [global] section shared by the built-in jobs.
fio_global() {
	cat <<-EOF
		[global]
		filename=$DISK
		direct=1
		ioengine=$p_ioengine
		iodepth=$1
		numjobs=$p_numjobs
		cpus_allowed=0-$((NCPU - 1))
		cpus_allowed_policy=split
	EOF
}

# run_fio NAME JOBFILE: run fio and emit its JSON output as result NAME.
run_fio() {
	echo "== $1"
	cat "$2"
	: >"/tmp/$1.json"
	fio --eta=never --output-format=json --output="/tmp/$1.json" "$2"
	emit "$1" $? "/tmp/$1.json"
}

job_md5() {
	size=$(bytes "${p_size:-64M}")
	dd if="$DISK" bs=64k count="$size" iflag=direct,count_bytes 2>/dev/null |
		md5sum >/tmp/md5
	rc=$?
	sed -i 's/ .*//' /tmp/md5
	emit md5 $rc /tmp/md5
}

# Each block size gets its own numjobs slices of the region, so no two fio
# processes write the same block and every block is verified.
job_fio_verify() {
	size=$(bytes "${p_size:-64M}")
	bss=$(echo "${p_bs:-4k,64k}" | tr , ' ')
	n=0 maxbs=512
	for bs in $bss; do
		n=$((n + 1))
		b=$(bytes "$bs")
		[ "$b" -gt "$maxbs" ] && maxbs=$b
	done
	slice=$((size / (n * p_numjobs) / maxbs * maxbs))
	{
		fio_global "${p_iodepth:-16}"
		echo "rw=randwrite"
		echo "verify=crc32c"
		echo "verify_fatal=1"
		echo "size=$slice"
		echo "offset_increment=$slice"
		i=0
		for bs in $bss; do
			echo "[write-$bs]"
			echo "bs=$bs"
			echo "offset=$((i * p_numjobs * slice))"
			i=$((i + 1))
		done
	} >/tmp/fio-verify.fio
	run_fio fio-verify /tmp/fio-verify.fio
	job_md5
}

job_fio_bench() {
	{
		fio_global "${p_iodepth:-32}"
		echo "rw=randread"
		echo "bs=${p_bs:-4k}"
		echo "time_based"
		echo "runtime=$p_runtime"
		echo "ramp_time=$p_ramp"
		echo "norandommap"
		echo "randrepeat=0"
		echo "group_reporting"
		[ -n "$p_size" ] && echo "size=$p_size"
		echo "[bench]"
	} >/tmp/fio-bench.fio
	run_fio fio-bench /tmp/fio-bench.fio
}

job_fio() {
	if ! cat /sys/firmware/qemu_fw_cfg/by_name/opt/blkgraph/fio/raw >/tmp/fio.fio; then
		echo "no fio job file in fw_cfg opt/blkgraph/fio" >/tmp/fio.json
		emit fio 2 /tmp/fio.json
		return
	fi
	run_fio fio /tmp/fio.fio
}

job_resize_wait() {
	q=/sys/block/${DISK#/dev/}
	before=$(cat "$q/size")
	echo "== resize-wait"
	i=0
	while [ "$(cat "$q/size")" = "$before" ] && [ $i -lt 600 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	after=$(cat "$q/size")
	rc=1
	if [ "$after" != "$before" ]; then
		last=$((after / 2048 - 1))
		dd if=/dev/urandom of=/tmp/tail bs=1M count=1 2>/dev/null &&
			dd if=/tmp/tail of="$DISK" bs=1M seek=$last oflag=direct conv=notrunc 2>/dev/null &&
			dd if="$DISK" of=/tmp/back bs=1M skip=$last count=1 iflag=direct 2>/dev/null &&
			cmp /tmp/tail /tmp/back && rc=0
	fi
	printf 'before=%s\nafter=%s\n' "$before" "$after" >/tmp/resize
	emit resize-wait $rc /tmp/resize
}

while read -r mod; do
	insmod "/lib/modules/$mod"
done </lib/modules/load.order

if [ "$p_job" != none ]; then
	i=0
	while [ ! -b "$DISK" ] && [ $i -lt 300 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	if [ -b "$DISK" ]; then
		q=/sys/block/${DISK#/dev/}
		{
			echo "queues=$(ls "$q/mq" | wc -l)"
			echo "sectors=$(cat "$q/size")"
			echo "logical_block_size=$(cat "$q/queue/logical_block_size")"
			echo "cpus=$NCPU"
		} >/tmp/disk
		emit disk 0 /tmp/disk
	else
		echo "$DISK did not appear" >/tmp/disk
		emit disk 1 /tmp/disk
		p_job=none
	fi
fi

for job in $(echo "$p_job" | tr , ' '); do
	case "$job" in
	fio-verify) job_fio_verify ;;
	fio-bench) job_fio_bench ;;
	fio) job_fio ;;
	md5) job_md5 ;;
	resize-wait) job_resize_wait ;;
	none) ;;
	*)
		echo "unknown job $job" >/tmp/unknown
		emit "$job" 127 /tmp/unknown
		;;
	esac
done

if [ -b "$DISK" ]; then
	blockdev --flushbufs "$DISK"
	# Interrupts of each request queue, for checking that all are used.
	awk -v n="$NCPU" '/-req\.[0-9]+$/ {
		s = 0
		for (i = 2; i <= n + 1; i++) s += $i
		q = $NF
		sub(/.*-req\./, "", q)
		print "req" q "=" s
	}' /proc/interrupts >/tmp/interrupts
	emit interrupts $? /tmp/interrupts
fi
echo "@@blkgraph-done" >"$RESULTS"
poweroff -f
