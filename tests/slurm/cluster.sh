#!/usr/bin/env bash
# A real single-node SLURM cluster (slurmctld + slurmd + slurmdbd/MariaDB accounting) for tests.
#
#   bash tests/slurm/cluster.sh start    # idempotent; ~6-10 s when the packages are installed
#   bash tests/slurm/cluster.sh status   # daemons, sinfo
#   bash tests/slurm/cluster.sh stop     # stops every daemon it started, by PID file
#
# Needs root and the Debian packages: slurmctld slurmd slurm-client munge slurmdbd mariadb-server
# (`start` installs them with apt-get when TDABENCH_SLURM_INSTALL=1 and they are missing).
# State, spool, PID and log files live under $TDABENCH_SLURM_DIR (default /tmp/tdabench-slurm).
# slurm.conf is written to /etc/slurm/slurm.conf as well: Snakemake's slurm executor strips
# SLURM_CONF inside jobs, so the default location must hold it. A foreign /etc/slurm/slurm.conf
# (one without our marker line) is never overwritten.
set -euo pipefail

DIR=${TDABENCH_SLURM_DIR:-/tmp/tdabench-slurm}
CLUSTER=${TDABENCH_SLURM_CLUSTER:-tdabench}
PARTITION=${TDABENCH_SLURM_PARTITION:-debug}
ACCOUNT=${TDABENCH_SLURM_ACCOUNT:-tdabench}
DB_PORT=${TDABENCH_SLURM_DB_PORT:-3307}
MARK="# written by tdabench tests/slurm/cluster.sh"
ETC=/etc/slurm
HOST=$(hostname -s)

log() { echo "[cluster.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() {  # alive PIDFILE -> 0 if the process in PIDFILE runs
  local f=$1 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.3
  done
}

stop_pid() {  # stop_pid PIDFILE NAME
  local f=$1 name=$2 pid
  if alive "$f"; then
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
    log "stopped $name ($pid)"
  fi
  rm -f "$f"
}

install_packages() {
  local need="" p
  for p in slurmctld slurmd slurm-client munge slurmdbd mariadb-server; do
    dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
  done
  [ -z "$need" ] && return 0
  [ "${TDABENCH_SLURM_INSTALL:-0}" = 1 ] ||
    die "missing packages:$need. Install them with: apt-get install -y$need (or set TDABENCH_SLURM_INSTALL=1)"
  log "installing$need"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
}

write_configs() {
  local cpus mem_kb mem_mb
  cpus=$(nproc)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  mem_mb=$((mem_kb / 1024 - 2048))
  [ "$mem_mb" -gt 512 ] || mem_mb=512
  mkdir -p "$DIR"/{state,spool,log,run,etc} "$ETC"
  if [ -e "$ETC/slurm.conf" ] && ! grep -qF "$MARK" "$ETC/slurm.conf"; then
    die "$ETC/slurm.conf exists and was not written by this script; move it away first"
  fi
  cat >"$DIR/etc/slurm.conf" <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
DefMemPerCPU=1000
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
  install -m 644 "$DIR/etc/slurm.conf" "$ETC/slurm.conf"
  install -m 600 "$DIR/etc/slurmdbd.conf" "$ETC/slurmdbd.conf"
}

start_munge() {
  if alive /run/munge/munged.pid; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing; reinstall munge or run mungekey"
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munge bash -c 'munge -n | unmunge' || die "munged did not answer; see /var/log/munge/munged.log"
  log "munged up"
}

mysql_cli() { mariadb --no-defaults -S "$DIR/mysql.sock" -u root "$@"; }

start_mariadb() {
  if alive "$DIR/run/mysql.pid"; then return 0; fi
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root \
      --auth-root-authentication-method=socket >"$DIR/log/mysql-install.log" 2>&1 ||
      die "mariadb-install-db failed; see $DIR/log/mysql-install.log"
  fi
  setsid nohup /usr/sbin/mariadbd --no-defaults --user=root --datadir="$DIR/mysql" \
    --socket="$DIR/mysql.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$DIR/run/mysql.pid" --log-error="$DIR/log/mysql.log" \
    --innodb-use-native-aio=0 --innodb-buffer-pool-size=64M --skip-log-bin \
    </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadb mysql_cli -e "SELECT 1" || die "MariaDB did not start; see $DIR/log/mysql.log"
  mysql_cli <<'EOF'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
  log "MariaDB up (port $DB_PORT, datadir $DIR/mysql)"
}

start_slurmdbd() {
  if ! alive "$DIR/run/slurmdbd.pid"; then
    /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster ||
      die "slurmdbd did not answer; see $DIR/log/slurmdbd.log"
    log "slurmdbd up"
  fi
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    log "registered cluster $CLUSTER"
  fi
}

add_account() {  # an account for the tests (profiles pass --account); needs slurmctld registered
  if ! sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" >/dev/null
    sacctmgr -i add user "$(id -un)" account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
    log "added account $ACCOUNT for $(id -un)"
  fi
}

node_ready() { sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

start_slurm() {
  if ! alive "$DIR/run/slurmctld.pid"; then
    /usr/sbin/slurmctld -i
    wait_for 30 slurmctld scontrol ping || die "slurmctld did not answer; see $DIR/log/slurmctld.log"
    log "slurmctld up"
  fi
  if ! alive "$DIR/run/slurmd.pid"; then
    /usr/sbin/slurmd
    log "slurmd started"
  fi
  if ! wait_for 30 "node ready" node_ready; then
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    wait_for 15 "node ready" node_ready || die "node $HOST is not idle: $(sinfo -h -N 2>&1); see $DIR/log/slurmd.log"
  fi
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "needs root (it starts munged, MariaDB and the SLURM daemons)"
  local t0=$SECONDS
  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  add_account
  log "cluster '$CLUSTER' ready in $((SECONDS - t0)) s: partition '$PARTITION', account '$ACCOUNT', $(nproc) CPUs"
  sinfo
}

cmd_stop() {
  # Jobs first: a job step (slurmstepd) outlives slurmd, so cancel what is queued or running on
  # this cluster and give slurmd a few seconds to reap it.
  if alive "$DIR/run/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs: $jobs"
      scancel $jobs 2>/dev/null || true
      wait_for 20 "empty queue" bash -c '[ -z "$(squeue -h 2>/dev/null)" ]' || log "jobs still listed: $(squeue -h)"
    fi
  fi
  stop_pid "$DIR/run/slurmd.pid" slurmd
  stop_pid "$DIR/run/slurmctld.pid" slurmctld
  stop_pid "$DIR/run/slurmdbd.pid" slurmdbd
  stop_pid "$DIR/run/mysql.pid" mariadb
  stop_pid /run/munge/munged.pid munged
  log "stopped"
}

cmd_status() {
  local n up=0
  for n in munged:/run/munge/munged.pid mariadb:$DIR/run/mysql.pid slurmdbd:$DIR/run/slurmdbd.pid \
           slurmctld:$DIR/run/slurmctld.pid slurmd:$DIR/run/slurmd.pid; do
    if alive "${n#*:}"; then echo "${n%%:*}: running ($(cat "${n#*:}"))"; up=$((up + 1));
    else echo "${n%%:*}: stopped"; fi
  done
  if [ $up -eq 5 ] && node_ready; then sinfo; return 0; fi
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_stop; cmd_start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
