#!/usr/bin/env bash
# TollGuard local integration-test infrastructure: Kafka (KRaft), Redis, SMTP sink.
#
# Everything listens on 127.0.0.1 only, on free ports chosen at start.  Nothing
# is written inside the git clone: downloads go to $TOLLGUARD_CACHE, runtime
# state (pids, ports, data, logs, received mail) to $TOLLGUARD_STATE.
# See deploy/local/README.md, or run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/local/services.sh COMMAND

Installs, starts, stops and reports on the real services that TollGuard's
integration tests need, all on 127.0.0.1:
  * Apache Kafka  - one KRaft node (broker+controller), jars from Maven Central
  * Redis         - Debian's redis-server, our own instance (not the system one)
  * SMTP sink     - deploy/local/smtp_sink.py (aiosmtpd), one .eml file per message
  * Redis Cluster - three more redis-server nodes in cluster mode (three
                    primaries, no replicas) for the scale-out tests

Commands:
  install        download/install whatever is missing (no-op when cached)
  start          install if needed, start all three (healthy ones are left
                 alone), write and print the env file
  stop           stop all three; removes Kafka's data dir (next start is fresh)
  status         print each service's state; exit 1 if any is down
  env            print the env file (source it: eval "$(services.sh env)")
  stop-kafka     stop only the broker, keeping its port and data
  start-kafka    start only the broker, on the same port with the same data
  restart-kafka  stop-kafka then start-kafka
  cluster        start only the three-node Redis Cluster (also part of start)
  stop-cluster   stop only the Redis Cluster (its data is not persisted)
  -h, --help     this text

Environment:
  TOLLGUARD_CACHE       downloads      (default: $HOME/.cache/tollguard)
  TOLLGUARD_STATE       runtime state  (default: $TOLLGUARD_CACHE/state)
  TOLLGUARD_KAFKA_WAIT  seconds to wait for the broker (default: 90)
  TOLLGUARD_KAFKA_HEAP  broker heap flags (default: "-Xmx512m -Xms256m")
  TOLLGUARD_PYTHON      python for the SMTP sink's environment (default: python3)
  JAVA_HOME             Java 17+ to run Kafka with (default: java on PATH)

The env file ($TOLLGUARD_STATE/env) exports TOLLGUARD_KAFKA_BOOTSTRAP,
TOLLGUARD_REDIS_URL, TOLLGUARD_SMTP_ADDR, TOLLGUARD_SMTP_MAILDIR,
TOLLGUARD_KAFKA_HOME and, when the cluster runs, TOLLGUARD_REDIS_CLUSTER_URLS
(the three nodes' redis:// URLs separated by commas).  Progress goes to stderr, prefixed [services].
EOF
}

# ----------------------------------------------------------------------------
# Pinned versions.  Kafka 4.x needs Java 17+ for the broker; its jars are
# class-file version 61, so the machine's Java 17 runs them.  LOG4J_VERSION is
# the log4j2 that kafka-server $KAFKA_VERSION depends on; log4j-slf4j-impl (the
# SLF4J 1.7 -> log4j2 binding, as in Kafka's own distribution) is pinned to it.
KAFKA_VERSION="4.4.0"
LOG4J_VERSION="2.25.5"
SCALA_BINARY="2.13"
AIOSMTPD_VERSION="1.4.6"
DEPENDENCY_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TOLLGUARD_CACHE:-$HOME/.cache/tollguard}"
STATE="${TOLLGUARD_STATE:-$CACHE/state}"
KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"
KAFKA_MARKER="$KAFKA_HOME/.installed"
VENV="$CACHE/venv"
PYLIB="$CACHE/pylib" # fallback when `python -m venv` is unavailable
PY="${TOLLGUARD_PYTHON:-python3}"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
KAFKA_WAIT="${TOLLGUARD_KAFKA_WAIT:-90}"
KAFKA_HEAP="${TOLLGUARD_KAFKA_HEAP:--Xmx512m -Xms256m}"

KSTATE="$STATE/kafka"
RSTATE="$STATE/redis"
CSTATE="$STATE/redis-cluster"
CLUSTER_NODES=3
SSTATE="$STATE/smtp"
MAILDIR="$STATE/mail"
ENV_FILE="$STATE/env"

log() { printf '[services] %s\n' "$*" >&2; }
die() {
  printf '[services] ERROR: %s\n' "$*" >&2
  exit 1
}
now_ms() { date +%s%3N; }

# ----------------------------------------------------------------------------
# Small helpers: ports, pids, locking.

# Print N distinct free loopback ports (all bound at once, so never duplicates).
free_ports() {
  python3 - "$1" <<'PYEOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PYEOF
}

# True when PORT can be listened on again (SO_REUSEADDR, like the servers do).
port_free() {
  python3 -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

# pid_alive PIDFILE PATTERN: the pid in PIDFILE is running and its command
# line contains PATTERN (guards against recycled pids; zombies count as dead).
pid_alive() {
  local file=$1 pat=$2 pid
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pat"
}

# stop_pidfile NAME PIDFILE PATTERN TIMEOUT_S: SIGTERM, wait, then SIGKILL.
stop_pidfile() {
  local name=$1 file=$2 pat=$3 timeout=$4 pid deadline
  if ! pid_alive "$file" "$pat"; then
    rm -f "$file"
    log "$name: not running"
    return 0
  fi
  pid=$(<"$file")
  log "$name: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + timeout))
  while pid_alive "$file" "$pat" && ((SECONDS < deadline)); do sleep 0.2; done
  if pid_alive "$file" "$pat"; then
    log "$name: still alive after ${timeout}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while pid_alive "$file" "$pat" && ((SECONDS < deadline)); do sleep 0.2; done
    pid_alive "$file" "$pat" && die "$name: pid $pid survived SIGKILL"
  fi
  rm -f "$file"
  log "$name: stopped"
}

# pick_port SAVED_PORT: reuse the saved port if it is still free, else a new one.
pick_port() {
  if [[ -n ${1:-} ]] && port_free "$1"; then echo "$1"; else free_ports 1; fi
}

# Serialise concurrent invocations (e.g. two test runners calling `start`).
# Every daemon is launched with `9>&-` so it does not inherit the lock.
take_lock() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w 600 9 || die "could not lock $STATE/.lock within 600s"
}

# ----------------------------------------------------------------------------
# Kafka

kafka_installed() {
  [[ -f $KAFKA_MARKER && -f $KAFKA_HOME/libs/kafka_${SCALA_BINARY}-${KAFKA_VERSION}.jar ]]
}

check_java() {
  command -v "$JAVA" >/dev/null 2>&1 || die "java not found ($JAVA); Kafka $KAFKA_VERSION needs Java 17+"
  local v
  v=$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')
  if ! [[ $v =~ ^[0-9]+$ ]] || ((v < 17)); then
    die "Kafka $KAFKA_VERSION needs Java 17+, $JAVA is '${v:-unknown}'"
  fi
}

install_kafka() {
  if kafka_installed; then
    write_kafka_support_files
    return 0
  fi
  check_java
  command -v mvn >/dev/null 2>&1 || die "mvn not found (apt-get install -y maven)"
  local t0 tmp n
  t0=$(now_ms)
  log "kafka: installing kafka_${SCALA_BINARY}:$KAFKA_VERSION + runtime deps from Maven Central into $KAFKA_HOME/libs"
  mkdir -p "$CACHE"
  tmp=$(mktemp -d "$CACHE/.kafka-install.XXXXXX")
  # Throwaway pom: the broker (kafka_2.13), the CLI tools (TopicCommand,
  # console producer/consumer, ...) and the SLF4J -> log4j2 binding.
  cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.tollguard</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_${SCALA_BINARY}</artifactId>
      <version>${KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>${KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>${LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
EOF
  if ! mvn -B -q -f "$tmp/pom.xml" "$DEPENDENCY_PLUGIN:copy-dependencies" \
    -DincludeScope=runtime -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1; then
    tail -n 40 "$tmp/mvn.log" >&2 || true
    die "kafka: Maven could not fetch the jars (full log: $tmp/mvn.log)"
  fi
  local jar
  for jar in "kafka_${SCALA_BINARY}-$KAFKA_VERSION" "kafka-clients-$KAFKA_VERSION" \
    "kafka-tools-$KAFKA_VERSION" "kafka-server-$KAFKA_VERSION" "log4j-core-$LOG4J_VERSION" \
    "log4j-slf4j-impl-$LOG4J_VERSION" "scala-library-"; do
    compgen -G "$tmp/libs/$jar*.jar" >/dev/null || die "kafka: $jar*.jar missing after Maven copy (log: $tmp/mvn.log)"
  done
  rm -rf "$KAFKA_HOME/libs"
  mkdir -p "$KAFKA_HOME"
  mv "$tmp/libs" "$KAFKA_HOME/libs"
  n=$(find "$KAFKA_HOME/libs" -name '*.jar' | wc -l)
  printf 'kafka_%s %s\nlog4j %s\njars %s\ninstalled %s\n' "$SCALA_BINARY" "$KAFKA_VERSION" \
    "$LOG4J_VERSION" "$n" "$(date -u +%FT%TZ)" >"$KAFKA_MARKER"
  rm -rf "$tmp"
  write_kafka_support_files
  log "kafka: installed $n jars in $(($(now_ms) - t0)) ms"
}

# log4j2 configs and bin/ wrappers in $KAFKA_HOME (rewritten every run: cheap,
# and keeps them in step with this script).
write_kafka_support_files() {
  mkdir -p "$KAFKA_HOME/config" "$KAFKA_HOME/bin"
  # Broker: everything to ${kafka.logs.dir}/server.log, nothing to stdout.
  cat >"$KAFKA_HOME/config/log4j2.properties" <<'EOF'
status = warn
name = tollguard-kafka-broker
property.logdir = ${sys:kafka.logs.dir}
appender.server.type = RollingFile
appender.server.name = server
appender.server.fileName = ${logdir}/server.log
appender.server.filePattern = ${logdir}/server.log.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 50MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.server.ref = server
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.controller.name = org.apache.kafka.controller
logger.controller.level = INFO
EOF
  # CLI tools: warnings and errors only, to stderr.
  cat >"$KAFKA_HOME/config/tools-log4j2.properties" <<'EOF'
status = warn
name = tollguard-kafka-tools
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = stderr
EOF
  cat >"$KAFKA_HOME/bin/kafka-run-class.sh" <<'EOF'
#!/bin/sh
# shellcheck disable=SC2086 # KAFKA_TOOLS_HEAP is a list of JVM flags
# Run a class from this Kafka's jars: kafka-run-class.sh CLASS [ARGS...]
# (generated by deploy/local/services.sh)
KAFKA_HOME=$(cd "$(dirname "$0")/.." && pwd)
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
exec "$JAVA" ${KAFKA_TOOLS_HEAP:--Xmx256m} -XX:+UseSerialGC -Djava.awt.headless=true \
  -Dlog4j2.configurationFile="$KAFKA_HOME/config/tools-log4j2.properties" \
  -cp "$KAFKA_HOME/libs/*" "$@"
EOF
  local pair name class
  for pair in \
    kafka-topics.sh=org.apache.kafka.tools.TopicCommand \
    kafka-console-producer.sh=org.apache.kafka.tools.ConsoleProducer \
    kafka-console-consumer.sh=org.apache.kafka.tools.consumer.ConsoleConsumer \
    kafka-consumer-groups.sh=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    kafka-get-offsets.sh=org.apache.kafka.tools.GetOffsetShell \
    kafka-storage.sh=kafka.tools.StorageTool; do
    name=${pair%%=*} class=${pair#*=}
    # shellcheck disable=SC2016 # $0 and $@ belong to the generated script
    printf '#!/bin/sh\n# generated by deploy/local/services.sh\nexec "$(dirname "$0")/kafka-run-class.sh" %s "$@"\n' \
      "$class" >"$KAFKA_HOME/bin/$name"
  done
  chmod +x "$KAFKA_HOME"/bin/*.sh
}

kafka_running() { pid_alive "$KSTATE/kafka.pid" "kafka.Kafka"; }

# Saved ports: "<broker port> <controller port>".
kafka_ports() {
  [[ -s $KSTATE/ports ]] && cat "$KSTATE/ports"
}

# Does the broker on PORT answer a Kafka Metadata request listing a broker?
# (raw protocol over a socket: ApiVersions v0, then Metadata v4..v8.)
kafka_probe() {
  timeout 10 python3 - "$1" <<'PYEOF'
import socket, struct, sys

def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("connection closed")
        b += c
    return b

def call(s, key, ver, cid, body):
    client = b"tollguard-probe"
    msg = struct.pack(">hhih", key, ver, cid, len(client)) + client + body
    s.sendall(struct.pack(">i", len(msg)) + msg)
    (n,) = struct.unpack(">i", recvn(s, 4))
    data = recvn(s, n)
    if struct.unpack(">i", data[:4])[0] != cid:
        raise ValueError("correlation id mismatch")
    return data[4:]

def string(buf, off):
    (n,) = struct.unpack_from(">h", buf, off)
    off += 2
    if n < 0:
        return None, off
    return buf[off:off + n].decode(), off + n

try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
    r = call(s, 18, 0, 1, b"")  # ApiVersions v0
    err, cnt = struct.unpack_from(">hi", r, 0)
    if err:
        sys.exit(f"ApiVersions error {err}")
    versions = {}
    for i in range(cnt):
        k, lo, hi = struct.unpack_from(">hhh", r, 6 + 6 * i)
        versions[k] = (lo, hi)
    lo, hi = versions[3]
    v = max(lo, 4)
    if v > min(hi, 8):
        print("answers ApiVersions (no non-flexible Metadata version to probe)")
        sys.exit(0)
    body = struct.pack(">ib", 0, 0)  # no topics, allow_auto_topic_creation=false
    if v >= 8:
        body += b"\x00\x00"  # include_{cluster,topic}_authorized_operations=false
    r = call(s, 3, v, 2, body)
    off = 4  # throttle_time_ms
    (nb,) = struct.unpack_from(">i", r, off)
    off += 4
    brokers = []
    for _ in range(nb):
        (node,) = struct.unpack_from(">i", r, off)
        host, off = string(r, off + 4)
        (port,) = struct.unpack_from(">i", r, off)
        _, off = string(r, off + 4)  # rack
        brokers.append(f"{node}@{host}:{port}")
    cluster, off = string(r, off)
    if not brokers:
        sys.exit("metadata lists no broker yet")
    print(f"cluster {cluster}, brokers {','.join(brokers)}")
except SystemExit:
    raise
except Exception as e:  # not up yet
    sys.exit(f"{type(e).__name__}: {e}")
PYEOF
}

kafka_fail() {
  log "kafka: $1"
  log "---- tail of $KSTATE/logs/server.log ----"
  tail -n 40 "$KSTATE/logs/server.log" >&2 2>/dev/null || true
  if [[ -s $KSTATE/kafka.out ]]; then
    log "---- tail of $KSTATE/kafka.out ----"
    tail -n 20 "$KSTATE/kafka.out" >&2 || true
  fi
  stop_pidfile kafka "$KSTATE/kafka.pid" "kafka.Kafka" 30 || true
  exit 1
}

kafka_wait_ready() {
  local port=$1 deadline=$((SECONDS + KAFKA_WAIT)) out
  while :; do
    if out=$(kafka_probe "$port" 2>&1); then
      log "kafka: ready on 127.0.0.1:$port ($out)"
      return 0
    fi
    kafka_running || kafka_fail "broker process exited during startup (last probe: $out)"
    ((SECONDS < deadline)) || kafka_fail "not ready after ${KAFKA_WAIT}s (last probe: $out)"
    sleep 0.5
  done
}

write_kafka_config() {
  local port=$1 cport=$2
  cat >"$KSTATE/server.properties" <<EOF
# generated by deploy/local/services.sh
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${cport}
listeners=PLAINTEXT://127.0.0.1:${port},CONTROLLER://127.0.0.1:${cport}
advertised.listeners=PLAINTEXT://127.0.0.1:${port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=${KSTATE}/data
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=67108864
EOF
}

# start_kafka MODE: MODE=any (for `start`: reuse saved ports/data when
# possible, else start fresh) or MODE=same (for `start-kafka`: same port and
# data, or fail).
start_kafka() {
  local mode=$1 port="" cport="" ports fresh=1
  install_kafka
  mkdir -p "$KSTATE/logs"
  ports=$(kafka_ports || true)
  if [[ -n $ports ]]; then read -r port cport <<<"$ports"; fi
  if kafka_running; then
    if [[ -n $port ]] && kafka_probe "$port" >/dev/null 2>&1; then
      log "kafka: already running (pid $(<"$KSTATE/kafka.pid"), 127.0.0.1:$port)"
      return 0
    fi
    log "kafka: process alive but not answering yet; waiting"
    [[ -n $port ]] || kafka_fail "running without a saved port in $KSTATE/ports"
    kafka_wait_ready "$port"
    return 0
  fi
  rm -f "$KSTATE/kafka.pid"

  if [[ -n $port && -f $KSTATE/server.properties && -f $KSTATE/data/meta.properties ]]; then
    if port_free "$port" && port_free "$cport"; then
      fresh=0
      log "kafka: restarting with existing data on 127.0.0.1:$port (controller $cport)"
    elif [[ $mode == same ]]; then
      die "kafka: saved port $port or controller port $cport is taken by another process; use 'start' for a fresh broker"
    else
      log "kafka: saved port $port/$cport is taken; starting a fresh broker on new ports"
    fi
  elif [[ $mode == same && -n $port ]]; then
    log "kafka: no data from a previous run; starting a fresh broker"
  fi

  if ((fresh)); then
    if [[ -n $port ]] && port_free "$port" && port_free "$cport" && [[ $port != "$cport" ]]; then
      : # reuse the previous ports: keeps the env file stable across stop/start
    else
      read -r port cport <<<"$(free_ports 2)"
    fi
    echo "$port $cport" >"$KSTATE/ports"
    rm -rf "$KSTATE/data"
    write_kafka_config "$port" "$cport"
    local cluster_id
    # Never an id starting with "-": `format -t` would take it for an option.
    cluster_id=$(python3 -c '
import base64, uuid
while True:
    i = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not i.startswith("-"):
        print(i)
        break
')
    log "kafka: formatting KRaft storage (cluster $cluster_id)"
    if ! "$JAVA" -Xmx256m -XX:+UseSerialGC -Dlog4j2.configurationFile="$KAFKA_HOME/config/tools-log4j2.properties" \
      -cp "$KAFKA_HOME/libs/*" kafka.tools.StorageTool format \
      -t "$cluster_id" -c "$KSTATE/server.properties" >"$KSTATE/format.log" 2>&1 </dev/null; then
      cat "$KSTATE/format.log" >&2
      die "kafka: formatting storage failed"
    fi
  fi

  local -a heap
  read -r -a heap <<<"$KAFKA_HEAP"
  log "kafka: starting broker $KAFKA_VERSION on 127.0.0.1:$port (controller 127.0.0.1:$cport), logs in $KSTATE/logs"
  (
    cd "$KSTATE"
    exec setsid "$JAVA" "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
      -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
      -Dkafka.logs.dir="$KSTATE/logs" \
      -Dlog4j2.configurationFile="$KAFKA_HOME/config/log4j2.properties" \
      -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$KSTATE/server.properties" \
      </dev/null >"$KSTATE/kafka.out" 2>&1 9>&-
  ) &
  echo $! >"$KSTATE/kafka.pid"
  kafka_wait_ready "$port"
}

stop_kafka() {
  # Controlled shutdown of a single KRaft node normally takes a few seconds.
  stop_pidfile kafka "$KSTATE/kafka.pid" "kafka.Kafka" 60
}

kafka_status() {
  local ports port out
  ports=$(kafka_ports || true)
  port=${ports%% *}
  if ! kafka_running; then
    echo "kafka: DOWN"
    return 1
  fi
  if out=$(kafka_probe "$port" 2>&1); then
    echo "kafka: running (pid $(<"$KSTATE/kafka.pid"), 127.0.0.1:$port, $out)"
  else
    echo "kafka: UNHEALTHY (pid $(<"$KSTATE/kafka.pid"), 127.0.0.1:$port: $out)"
    return 1
  fi
}

# ----------------------------------------------------------------------------
# Redis

install_redis() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 || die "redis-server is not installed and apt-get is unavailable"
  log "redis: installing Debian's redis-server (apt-get)"
  # Keep the package's own system service from starting: we run our own
  # instance.  Only when the machine has no policy-rc.d of its own.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
  fi
  local rc=0 aptlog="$STATE/apt.log"
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server
  } </dev/null >"$aptlog" 2>&1 9>&- || rc=$?
  if ((made_policy)); then rm -f "$policy"; fi
  if ((rc != 0)); then
    tail -n 30 "$aptlog" >&2 || true
    die "redis: apt-get install redis-server failed (rc $rc, log: $aptlog)"
  fi
  command -v redis-server >/dev/null 2>&1 || die "redis: redis-server still not on PATH after install"
}

redis_running() { pid_alive "$RSTATE/redis.pid" "redis-server"; }
redis_ping() { [[ $(timeout 5 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]]; }

start_redis() {
  install_redis
  mkdir -p "$RSTATE"
  local port
  port=$(cat "$RSTATE/port" 2>/dev/null || true)
  if redis_running && [[ -n $port ]] && redis_ping "$port"; then
    log "redis: already running (pid $(<"$RSTATE/redis.pid"), 127.0.0.1:$port)"
    return 0
  fi
  if [[ -e $RSTATE/redis.pid ]]; then stop_pidfile redis "$RSTATE/redis.pid" "redis-server" 10; fi
  port=$(pick_port "$port")
  echo "$port" >"$RSTATE/port"
  log "redis: starting on 127.0.0.1:$port"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --dir "$RSTATE" --pidfile "$RSTATE/redis.pid" \
    --logfile "$RSTATE/redis.log" </dev/null >/dev/null 2>&1 9>&- ||
    die "redis: redis-server failed to start (see $RSTATE/redis.log)"
  local deadline=$((SECONDS + 20))
  until redis_running && redis_ping "$port"; do
    if ((SECONDS >= deadline)); then
      tail -n 20 "$RSTATE/redis.log" >&2 || true
      die "redis: no PONG on 127.0.0.1:$port after 20s"
    fi
    sleep 0.2
  done
  log "redis: ready on 127.0.0.1:$port"
}

redis_status() {
  local port
  port=$(cat "$RSTATE/port" 2>/dev/null || true)
  if ! redis_running; then
    echo "redis: DOWN"
    return 1
  fi
  if redis_ping "$port"; then
    echo "redis: running (pid $(<"$RSTATE/redis.pid"), 127.0.0.1:$port, PONG)"
  else
    echo "redis: UNHEALTHY (pid $(<"$RSTATE/redis.pid"), no PONG on 127.0.0.1:$port)"
    return 1
  fi
}

# ----------------------------------------------------------------------------
# Redis Cluster: three primaries (no replicas) of the same redis-server, each
# in $CSTATE/node<i> with its client port and its cluster-bus port saved in
# $CSTATE/ports ("<port> <bus port>" per line). Nothing is persisted: a node
# that died loses its keys, so a partly dead cluster is torn down and created
# afresh rather than rejoined.

cluster_ports() { [[ -s $CSTATE/ports ]] && cut -d' ' -f1 "$CSTATE/ports"; }

cluster_node_running() { pid_alive "$CSTATE/node$1/redis.pid" "redis-server"; }

# True when every node runs, answers PONG and reports cluster_state:ok.
cluster_healthy() {
  local i=0 port
  [[ -s $CSTATE/ports ]] || return 1
  for port in $(cluster_ports); do
    i=$((i + 1))
    cluster_node_running "$i" || return 1
    [[ $(timeout 5 redis-cli -h 127.0.0.1 -p "$port" cluster info 2>/dev/null | tr -d '\r' |
      sed -n 's/^cluster_state://p') == ok ]] || return 1
  done
  ((i == CLUSTER_NODES))
}

stop_cluster() {
  local i
  for ((i = 1; i <= CLUSTER_NODES; i++)); do
    if [[ -e $CSTATE/node$i/redis.pid ]]; then
      stop_pidfile "redis-cluster node $i" "$CSTATE/node$i/redis.pid" "redis-server" 15
    fi
  done
  rm -rf "${CSTATE:?}"/node*
}

start_cluster() {
  install_redis
  mkdir -p "$CSTATE"
  if cluster_healthy; then
    log "redis-cluster: already running (127.0.0.1:$(cluster_ports | paste -sd, | sed 's/,/, 127.0.0.1:/g'))"
    return 0
  fi
  # Some node is down or the cluster never formed: start from scratch.
  stop_cluster
  local -a saved=() ports=() buses=()
  local i p b line
  if [[ -s $CSTATE/ports ]]; then mapfile -t saved <"$CSTATE/ports"; fi
  for ((i = 0; i < CLUSTER_NODES; i++)); do
    line=${saved[i]:-}
    p=${line%% *} b=${line##* }
    if [[ -n $line ]] && port_free "$p" && port_free "$b"; then
      ports+=("$p") buses+=("$b")
    else
      ports=() buses=()
      break
    fi
  done
  if ((${#ports[@]} != CLUSTER_NODES)); then
    read -r -a ports <<<"$(free_ports $((2 * CLUSTER_NODES)))"
    buses=("${ports[@]:CLUSTER_NODES}")
    ports=("${ports[@]:0:CLUSTER_NODES}")
  fi
  : >"$CSTATE/ports.tmp"
  for ((i = 0; i < CLUSTER_NODES; i++)); do
    echo "${ports[i]} ${buses[i]}" >>"$CSTATE/ports.tmp"
  done
  mv "$CSTATE/ports.tmp" "$CSTATE/ports"
  local dir
  for ((i = 0; i < CLUSTER_NODES; i++)); do
    dir="$CSTATE/node$((i + 1))"
    mkdir -p "$dir"
    log "redis-cluster: starting node $((i + 1)) on 127.0.0.1:${ports[i]} (bus ${buses[i]})"
    redis-server --port "${ports[i]}" --bind 127.0.0.1 --save '' --appendonly no \
      --cluster-enabled yes --cluster-port "${buses[i]}" --cluster-config-file "$dir/nodes.conf" \
      --cluster-node-timeout 5000 --daemonize yes --dir "$dir" --pidfile "$dir/redis.pid" \
      --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 9>&- ||
      die "redis-cluster: node $((i + 1)) failed to start (see $dir/redis.log)"
  done
  local deadline=$((SECONDS + 20))
  for ((i = 0; i < CLUSTER_NODES; i++)); do
    until cluster_node_running $((i + 1)) && redis_ping "${ports[i]}"; do
      if ((SECONDS >= deadline)); then
        tail -n 20 "$CSTATE/node$((i + 1))/redis.log" >&2 || true
        die "redis-cluster: node $((i + 1)) gives no PONG on 127.0.0.1:${ports[i]} after 20s"
      fi
      sleep 0.2
    done
  done
  local -a addrs=()
  for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done
  if ! timeout 60 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes \
    </dev/null >"$CSTATE/create.log" 2>&1 9>&-; then
    cat "$CSTATE/create.log" >&2
    die "redis-cluster: redis-cli --cluster create failed"
  fi
  deadline=$((SECONDS + 30))
  until cluster_healthy; do
    ((SECONDS < deadline)) || die "redis-cluster: cluster_state not ok on every node after 30s"
    sleep 0.3
  done
  log "redis-cluster: ready on ${addrs[*]}"
}

cluster_status() {
  if [[ ! -s $CSTATE/ports ]] || ! cluster_node_running 1; then
    echo "redis-cluster: DOWN"
    return 1
  fi
  if cluster_healthy; then
    echo "redis-cluster: running (127.0.0.1:$(cluster_ports | paste -sd ' ' | sed 's/ /, 127.0.0.1:/g'), cluster_state:ok)"
  else
    echo "redis-cluster: UNHEALTHY (a node is down or cluster_state is not ok)"
    return 1
  fi
}

cluster_urls() {
  cluster_ports | sed 's|.*|redis://127.0.0.1:&/|' | paste -sd,
}

# ----------------------------------------------------------------------------
# SMTP sink (aiosmtpd)

# Command prefix that runs a python able to import aiosmtpd (empty if none yet).
smtp_python() {
  if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
    echo "$VENV/bin/python"
  elif [[ -d $PYLIB/aiosmtpd ]] && PYTHONPATH="$PYLIB" "$PY" -c 'import aiosmtpd' 2>/dev/null; then
    echo "env PYTHONPATH=$PYLIB $PY"
  fi
}

install_smtp() {
  [[ -n $(smtp_python) ]] && return 0
  command -v "$PY" >/dev/null 2>&1 || die "smtp: $PY not found"
  local t0
  t0=$(now_ms)
  mkdir -p "$CACHE"
  log "smtp: installing aiosmtpd==$AIOSMTPD_VERSION from PyPI into $VENV"
  rm -rf "$VENV"
  if "$PY" -m venv "$VENV" >/dev/null 2>&1 && [[ -x $VENV/bin/python ]] &&
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "aiosmtpd==$AIOSMTPD_VERSION" >&2 9>&- ||
      die "smtp: pip install aiosmtpd into $VENV failed"
  else
    # e.g. Debian's python3 without the python3-venv package: install with
    # pip --target (also fine on PEP 668 "externally managed" pythons).
    rm -rf "$VENV" "$PYLIB"
    log "smtp: '$PY -m venv' unavailable; using pip install --target $PYLIB"
    "$PY" -m pip install -q --disable-pip-version-check --target "$PYLIB" \
      "aiosmtpd==$AIOSMTPD_VERSION" >&2 9>&- || die "smtp: pip install --target $PYLIB aiosmtpd failed"
  fi
  [[ -n $(smtp_python) ]] || die "smtp: aiosmtpd still not importable after install"
  log "smtp: installed in $(($(now_ms) - t0)) ms"
}

smtp_running() { pid_alive "$SSTATE/smtp.pid" "smtp_sink.py"; }

# Does 127.0.0.1:PORT greet with an SMTP 220 banner?
smtp_probe() {
  timeout 10 python3 - "$1" <<'PYEOF'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
    banner = s.makefile("rb").readline()
    s.sendall(b"QUIT\r\n")
    s.close()
except OSError as e:
    sys.exit(str(e))
sys.exit(0 if banner.startswith(b"220") else f"bad banner {banner!r}")
PYEOF
}

start_smtp() {
  install_smtp
  mkdir -p "$SSTATE" "$MAILDIR"
  local port
  port=$(cat "$SSTATE/port" 2>/dev/null || true)
  if smtp_running && [[ -n $port ]] && smtp_probe "$port" 2>/dev/null; then
    log "smtp: already running (pid $(<"$SSTATE/smtp.pid"), 127.0.0.1:$port)"
    return 0
  fi
  if [[ -e $SSTATE/smtp.pid ]]; then stop_pidfile smtp "$SSTATE/smtp.pid" "smtp_sink.py" 10; fi
  port=$(pick_port "$port")
  echo "$port" >"$SSTATE/port"
  local -a pycmd
  read -r -a pycmd <<<"$(smtp_python)"
  log "smtp: starting sink on 127.0.0.1:$port, mail to $MAILDIR"
  (
    exec setsid "${pycmd[@]}" -u "$SCRIPT_DIR/smtp_sink.py" --host 127.0.0.1 --port "$port" \
      --maildir "$MAILDIR" </dev/null >>"$SSTATE/smtp.log" 2>&1 9>&-
  ) &
  echo $! >"$SSTATE/smtp.pid"
  local deadline=$((SECONDS + 20))
  until smtp_probe "$port" 2>/dev/null; do
    if ! smtp_running || ((SECONDS >= deadline)); then
      tail -n 20 "$SSTATE/smtp.log" >&2 || true
      stop_pidfile smtp "$SSTATE/smtp.pid" "smtp_sink.py" 5 2>/dev/null || true
      die "smtp: sink not answering on 127.0.0.1:$port"
    fi
    sleep 0.2
  done
  log "smtp: ready on 127.0.0.1:$port"
}

smtp_status() {
  local port
  port=$(cat "$SSTATE/port" 2>/dev/null || true)
  if ! smtp_running; then
    echo "smtp: DOWN"
    return 1
  fi
  if smtp_probe "$port" 2>/dev/null; then
    echo "smtp: running (pid $(<"$SSTATE/smtp.pid"), 127.0.0.1:$port, maildir $MAILDIR)"
  else
    echo "smtp: UNHEALTHY (pid $(<"$SSTATE/smtp.pid"), no 220 banner on 127.0.0.1:$port)"
    return 1
  fi
}

# ----------------------------------------------------------------------------
# Env file

write_env() {
  local kport rport sport
  kport=$(kafka_ports | cut -d' ' -f1)
  rport=$(<"$RSTATE/port")
  sport=$(<"$SSTATE/port")
  {
    printf 'export TOLLGUARD_KAFKA_BOOTSTRAP=%q\n' "127.0.0.1:$kport"
    printf 'export TOLLGUARD_REDIS_URL=%q\n' "redis://127.0.0.1:$rport/"
    printf 'export TOLLGUARD_SMTP_ADDR=%q\n' "127.0.0.1:$sport"
    printf 'export TOLLGUARD_SMTP_MAILDIR=%q\n' "$MAILDIR"
    printf 'export TOLLGUARD_KAFKA_HOME=%q\n' "$KAFKA_HOME"
    if cluster_healthy; then
      printf 'export TOLLGUARD_REDIS_CLUSTER_URLS=%q\n' "$(cluster_urls)"
    fi
  } >"$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

print_env() {
  [[ -f $ENV_FILE ]] || die "no env file at $ENV_FILE; run '$0 start' first"
  cat "$ENV_FILE"
}

# ----------------------------------------------------------------------------

cmd_install() {
  install_kafka
  install_redis
  install_smtp
  log "installed: kafka $KAFKA_VERSION ($KAFKA_HOME), $(redis-server --version | cut -d' ' -f1-3), aiosmtpd $AIOSMTPD_VERSION"
}

cmd_start() {
  local t0
  t0=$(now_ms)
  # Redis and SMTP first: they are quick, the broker is the slow one.
  start_redis
  start_cluster
  start_smtp
  start_kafka any
  write_env
  log "all services up in $(($(now_ms) - t0)) ms; env file: $ENV_FILE"
  print_env
}

cmd_stop() {
  stop_kafka
  rm -rf "$KSTATE/data" "$KSTATE/server.properties"
  stop_pidfile smtp "$SSTATE/smtp.pid" "smtp_sink.py" 10
  stop_pidfile redis "$RSTATE/redis.pid" "redis-server" 15
  stop_cluster
  rm -f "$ENV_FILE" # its ports are dead now; `start` writes a new one
}

cmd_status() {
  local rc=0
  kafka_status || rc=1
  redis_status || rc=1
  smtp_status || rc=1
  cluster_status || rc=1
  if [[ -f $ENV_FILE ]]; then echo "env file: $ENV_FILE"; fi
  return "$rc"
}

# Rewrites the env file when the single-node services have ports saved.
refresh_env() {
  if [[ -s $RSTATE/port && -s $SSTATE/port ]] && kafka_ports >/dev/null; then write_env; fi
}

cmd_start_kafka() {
  start_kafka same
  if [[ -s $RSTATE/port && -s $SSTATE/port ]]; then write_env; fi
}

main() {
  local cmd=${1:-}
  case $cmd in
    -h | --help | help)
      usage
      return 0
      ;;
    "")
      usage >&2
      return 2
      ;;
  esac
  [[ $# -eq 1 ]] || die "too many arguments (see --help)"
  case $cmd in
    install | start | stop | status | env | stop-kafka | start-kafka | restart-kafka | cluster | stop-cluster) ;;
    *) die "unknown command '$cmd' (see --help)" ;;
  esac
  # status and env only read; everything else is serialised.
  case $cmd in status | env) ;; *) take_lock ;; esac
  case $cmd in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) print_env ;;
    stop-kafka) stop_kafka ;;
    start-kafka) cmd_start_kafka ;;
    restart-kafka)
      stop_kafka
      cmd_start_kafka
      ;;
    cluster)
      start_cluster
      refresh_env
      ;;
    stop-cluster)
      stop_cluster
      refresh_env
      ;;
  esac
}

main "$@"
