#!/usr/bin/env python3
"""Helper of `scripts/bench.sh pool` and `scripts/bench.sh sizing` (see docs/BENCHMARKS.md).

  bench_pool.py sample RUN.json BENCH_PID     one snapshot at a phase edge (kst bench's
                                              --phase-hook; phase and edge from its environment)
  bench_pool.py report RUN.json [...]         the tables of the pool runs, from their snapshots
  bench_pool.py size RUN.json LABEL           one snapshot of the store's size (sizing mode)
  bench_pool.py sizes RUN.json                the sizing table

RUN.json says what to watch: {"label", "store": "postgres"|"redis"|"fs", "instances",
"kst_pids", "sink_pid", "samples" (a .jsonl file), "bench" (kst bench --json output), and per
store: "pg_psql" (argv prefix of psql), "pg_db", "pg_pidfile" (postmaster.pid); "redis_ports",
"redis_pidfiles", "prefix"; "fs_path"}.

A snapshot holds: the machine's CPU ticks (/proc/stat), the CPU ticks of the kst serve
processes, of the store's processes (PostgreSQL: the postmaster, its live children and the
children it reaped; Redis: every node), of kst bench and of smtp-sink; and the store's
operation counters (PostgreSQL: pg_stat_statements of the database and pg_stat_database;
Redis: INFO commandstats of every primary).
"""
import json
import os
import re
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def proc_ticks(pid, children=False):
    """utime+stime of a process (and cutime+cstime of its reaped children), in ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    # fields[0] is the state (field 3); utime is field 14, stime 15, cutime 16, cstime 17.
    t = int(fields[11]) + int(fields[12])
    if children:
        t += int(fields[13]) + int(fields[14])
    return t


def children_of(ppid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            out.append(int(d))
    return out


def machine_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])
    idle = v[3] + v[4]
    return {"total": total, "busy": total - idle}


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.readline().strip())
    except (OSError, ValueError):
        return None


def store_ticks(run):
    if run["store"] == "postgres":
        pm = read_pid(run["pg_pidfile"])
        if pm is None:
            return 0
        return proc_ticks(pm, children=True) + sum(proc_ticks(c) for c in children_of(pm))
    if run["store"] == "redis":
        return sum(proc_ticks(p) for p in filter(None, map(read_pid, run["redis_pidfiles"])))
    return 0


def psql(run, sql):
    out = subprocess.run(run["pg_psql"] + ["-d", run["pg_db"], "-Atc", sql],
                         check=True, capture_output=True, text=True).stdout
    return out.strip()


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                          check=True, capture_output=True, text=True).stdout


def store_counters(run):
    if run["store"] == "postgres":
        stmts = psql(run, "SELECT coalesce(json_object_agg(query, calls), '{}') FROM ("
                          "SELECT query, sum(calls) AS calls FROM pg_stat_statements s "
                          "JOIN pg_database d ON d.oid = s.dbid "
                          "WHERE d.datname = current_database() GROUP BY query) q")
        db = psql(run, "SELECT row_to_json(d) FROM (SELECT xact_commit, xact_rollback, "
                       "tup_returned, tup_fetched, tup_inserted, tup_updated, tup_deleted, "
                       "blks_read, blks_hit FROM pg_stat_database "
                       "WHERE datname = current_database()) d")
        conns = int(psql(run, "SELECT count(*) - 1 FROM pg_stat_activity "
                              "WHERE datname = current_database()"))
        return {"statements": json.loads(stmts), "db": json.loads(db), "connections": conns}
    if run["store"] == "redis":
        cmds, conns = {}, 0
        for port in run["redis_ports"]:
            m = re.search(r"connected_clients:(\d+)", redis_cli(port, "info", "clients"))
            conns += int(m.group(1)) - 1 if m else 0  # without this redis-cli
            if "role:master" not in redis_cli(port, "info", "replication"):
                continue
            for line in redis_cli(port, "info", "commandstats").splitlines():
                m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
                if m:
                    cmds[m.group(1)] = cmds.get(m.group(1), 0) + int(m.group(2))
        return {"commands": cmds, "connections": conns}
    return {}


def sample(run_path, bench_pid):
    run = json.load(open(run_path))
    phase = os.environ.get("KST_BENCH_PHASE", "?")
    edge = os.environ.get("KST_BENCH_EDGE", "?")
    snap = {"phase": phase, "edge": edge}
    if edge == "start":
        snap["counters"] = store_counters(run)  # queries outside the measured CPU window
    snap["t"] = time.time()
    snap["machine"] = machine_ticks()
    snap["kst"] = sum(proc_ticks(p) for p in run["kst_pids"])
    snap["store"] = store_ticks(run)
    snap["bench"] = proc_ticks(int(bench_pid))
    snap["sink"] = proc_ticks(run["sink_pid"]) if run.get("sink_pid") else 0
    if edge == "end":
        snap["counters"] = store_counters(run)
    with open(run["samples"], "a") as f:
        f.write(json.dumps(snap) + "\n")


# Statements kst-postgres runs in the background (host probes every second), not per message.
BACKGROUND = re.compile(r"pg_is_in_recovery|pg_stat_replication|current_setting|^SHOW ", re.I)
# This script's own queries.
OWN = re.compile(r"pg_stat_statements|pg_stat_activity|pg_stat_database|pg_total_relation_size|"
                 r"pg_database_size|^CHECKPOINT", re.I)
# Redis commands that are not kst's work on behalf of a message (this script, cluster upkeep).
NOT_OPS = {"info", "ping", "cluster|slots", "cluster|nodes", "cluster|shards", "config|get",
           "readonly", "client|setinfo", "hello", "role", "command", "command|docs", "replconf",
           "memory|usage", "scan", "dbsize"}


def ops_per_message(run, start, end, messages):
    """{operation: count per message}, largest first, and the background rate."""
    a, b = start["counters"], end["counters"]
    secs = end["t"] - start["t"]
    ops, background = {}, 0.0
    if run["store"] == "postgres":
        for q, calls in b["statements"].items():
            d = calls - a["statements"].get(q, 0)
            if d <= 0 or OWN.search(q):
                continue
            if BACKGROUND.search(q):
                background += d
                continue
            ops[short_sql(q)] = ops.get(short_sql(q), 0) + d / messages
    elif run["store"] == "redis":
        for c, calls in b["commands"].items():
            d = calls - a["commands"].get(c, 0)
            if d > 0 and c not in NOT_OPS:
                ops[c] = d / messages
    return dict(sorted(ops.items(), key=lambda kv: -kv[1])), background / max(secs, 1e-9)


def short_sql(q):
    q = " ".join(q.split())
    return q if len(q) <= 90 else q[:87] + "..."


def report(paths):
    rows, ops_rows = [], []
    ncpu = os.cpu_count()
    for path in paths:
        run = json.load(open(path))
        snaps = [json.loads(line) for line in open(run["samples"]) if line.strip()]
        phases = {json.loads(line)["phase"]: json.loads(line)
                  for line in open(run["bench"]) if line.strip()}
        for phase, r in phases.items():
            s = next((x for x in snaps if x["phase"] == phase and x["edge"] == "start"), None)
            e = next((x for x in snaps if x["phase"] == phase and x["edge"] == "end"), None)
            if not s or not e:
                continue
            n = r["decided"] or r["messages"]
            wall = e["t"] - s["t"]
            dm = e["machine"]["total"] - s["machine"]["total"]
            busy = (e["machine"]["busy"] - s["machine"]["busy"]) / dm * ncpu if dm else 0
            ms = lambda k: (e[k] - s[k]) / TICK * 1000 / n
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r.get("outcomes", {}).items()))
            rows.append(
                f"| {run['label']} | {run['instances']} | {phase}s | {r['concurrency']} | "
                f"{r['messages']} | {r['rate']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{busy:.2f} of {ncpu} | {ms('kst'):.3f} | {ms('store'):.3f} | "
                f"{ms('bench'):.3f} | {ms('sink'):.3f} | {e['counters'].get('connections', '')} | "
                f"{run.get('load', '')} | {outcomes} |")
            ops, bg = ops_per_message(run, s, e, n)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in ops.items() if v >= 0.005)
            ops_rows.append(f"| {run['label']} | {run['instances']} | {phase}s | {shown} | "
                            f"{bg:.1f} |")
    print("| store | kst serve | load | c | messages | msg/s | p50 ms | p99 ms | "
          "CPU busy (cores) | kst CPU ms/msg | store CPU ms/msg | load tool ms/msg | "
          "smtp-sink ms/msg | store connections | load average before | outcomes |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    print("\n".join(rows))
    print()
    print("| store | kst serve | load | store operations per message | background ops/s |")
    print("|---|---:|---|---|---:|")
    print("\n".join(ops_rows))


# ---- sizing ----

def size(run_path, label):
    run = json.load(open(run_path))
    snap = {"label": label}
    if run["store"] == "postgres":
        psql(run, "CHECKPOINT")
        snap["tables"] = json.loads(psql(
            run, "SELECT json_object_agg(relname, pg_total_relation_size(oid)) FROM pg_class "
                 "WHERE relkind = 'r' AND relname LIKE 'kst%'"))
        snap["rows"] = json.loads(psql(
            run, "SELECT json_build_object('keys', (SELECT count(*) FROM kst_keys), "
                 "'history', (SELECT count(*) FROM kst_key_history), "
                 "'index', (SELECT count(*) FROM kst_key_index))"))
        snap["database"] = int(psql(run, "SELECT pg_database_size(current_database())"))
    elif run["store"] == "redis":
        mem, aof, keys, usage = 0, 0, 0, {}
        for port in run["redis_ports"]:
            if "role:master" not in redis_cli(port, "info", "replication"):
                continue
            info = redis_cli(port, "info", "memory") + redis_cli(port, "info", "persistence") \
                + redis_cli(port, "info", "keyspace")
            mem += int(re.search(r"used_memory:(\d+)", info).group(1))
            m = re.search(r"aof_current_size:(\d+)", info)
            aof += int(m.group(1)) if m else 0
            m = re.search(r"db0:keys=(\d+)", info)
            keys += int(m.group(1)) if m else 0
            # MEMORY USAGE of a few keys of each kind of this node.
            for k in redis_cli(port, "--scan", "--pattern", run["prefix"] + "*").split():
                kind = re.sub(r"^.*\}", "", k) if "}" in k else k[len(run["prefix"]):].split(":")[0]
                u = usage.setdefault(kind, [0, 0])
                if u[1] >= 200:
                    continue
                u[0] += int(redis_cli(port, "memory", "usage", k, "samples", "0").strip() or 0)
                u[1] += 1
        snap.update({"used_memory": mem, "aof": aof, "keys": keys,
                     "usage": {k: v[0] / v[1] for k, v in usage.items() if v[1]}})
    elif run["store"] == "fs":
        subprocess.run(["sync"], check=True)
        du = subprocess.run(["du", "-s", "--block-size=1", run["fs_path"]], check=True,
                            capture_output=True, text=True).stdout.split()[0]
        app = subprocess.run(["du", "-s", "--apparent-size", "--block-size=1", run["fs_path"]],
                             check=True, capture_output=True, text=True).stdout.split()[0]
        files = subprocess.run(["find", run["fs_path"], "-type", "f"], check=True,
                               capture_output=True, text=True).stdout.count("\n")
        snap.update({"disk": int(du), "apparent": int(app), "files": files})
    with open(run["samples"], "a") as f:
        f.write(json.dumps(snap) + "\n")


def sizes(paths):
    print("| store | state | keys | history entries | size | bytes per key (from empty) | "
          "bytes per added history entry |")
    print("|---|---|---:|---:|---|---:|---:|")
    for path in paths:
        run = json.load(open(path))
        snaps = {s["label"]: s for s in map(json.loads, open(run["samples"])) if "label" in s}
        n = run["publications"]
        e, one, two = snaps["empty"], snaps["one"], snaps["two"]
        if run["store"] == "postgres":
            tot = lambda s: sum(s["tables"].values())
            detail = lambda s: ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(s["tables"].items()) if v > 16384)
            for lab, s, hist in (("1 version each", one, n), ("2 versions each", two, 2 * n)):
                print(f"| PostgreSQL | {lab} | {n} | {hist} | tables {tot(s) / 1e6:.1f} MB "
                      f"({detail(s)}); index rows {s['rows']['index']}; database "
                      f"{s['database'] / 1e6:.1f} MB | {(tot(one) - tot(e)) / n:.0f} | "
                      f"{(tot(two) - tot(one)) / n:.0f} |")
        elif run["store"] == "redis":
            for lab, s, hist in (("1 version each", one, n), ("2 versions each", two, 2 * n)):
                usage = ", ".join(f"{k} {v:.0f} B" for k, v in sorted(s["usage"].items()))
                print(f"| Redis Cluster (primaries) | {lab} | {n} | {hist} | used_memory "
                      f"{(s['used_memory'] - e['used_memory']) / 1e6:.1f} MB above empty, AOF "
                      f"{(s['aof'] - e['aof']) / 1e6:.1f} MB, {s['keys'] - e['keys']} Redis keys; "
                      f"MEMORY USAGE per key: {usage} | "
                      f"{(one['used_memory'] - e['used_memory']) / n:.0f} (AOF "
                      f"{(one['aof'] - e['aof']) / n:.0f}) | "
                      f"{(two['used_memory'] - one['used_memory']) / n:.0f} (AOF "
                      f"{(two['aof'] - one['aof']) / n:.0f}) |")
        elif run["store"] == "fs":
            for lab, s, hist in (("1 version each", one, n), ("2 versions each", two, 2 * n)):
                print(f"| fs | {lab} | {n} | {hist} | {s['disk'] / 1e6:.1f} MB on disk "
                      f"({s['apparent'] / 1e6:.1f} MB apparent), {s['files']} files | "
                      f"{(one['disk'] - e['disk']) / n:.0f} (apparent "
                      f"{(one['apparent'] - e['apparent']) / n:.0f}) | "
                      f"{(two['disk'] - one['disk']) / n:.0f} (apparent "
                      f"{(two['apparent'] - one['apparent']) / n:.0f}) |")


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "sample" and len(sys.argv) == 4:
        sample(sys.argv[2], sys.argv[3])
    elif cmd == "report":
        report(sys.argv[2:])
    elif cmd == "size" and len(sys.argv) == 4:
        size(sys.argv[2], sys.argv[3])
    elif cmd == "sizes":
        sizes(sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
