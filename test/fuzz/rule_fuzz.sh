#!/usr/bin/env bash
# SQL-level fuzz driver of the share_when/enroll_when validation
# (rule_expr_compile in src/rule_expr.c).  That code needs the backend's
# parser and analyzer, which a standalone libFuzzer binary cannot link, so
# the texts go through portal_sync.attach() on a running server instead --
# ideally the sanitized one (SANITIZE_KEEP=1 bash test/sanitize.sh leaves
# its private installation; PG_BINDIR points at it).
#
# Each case is a seed of test/fuzz/corpus/rule_expr/seeds.txt or a mutation
# (token splices of two seeds, insertions of keywords/punctuation from a
# dictionary, truncations), tried as share_when and enroll_when of
# ehr.visit_note inside a savepoint.  Oracles:
#   * the server never crashes (the session survives every case, the
#     postmaster log has no "terminated by signal", no sanitizer log);
#   * an accepted rule never reads a table: EXPLAIN (VERBOSE, FORMAT JSON)
#     of "SELECT FROM ehr.visit_note WHERE <rule>" names no relation but
#     ehr.visit_note, has no SubPlan/InitPlan, and the stored node tree has
#     no SUBLINK, no function of OID >= 16384 and none of the table-reading
#     built-ins.
#
#   bash test/fuzz/rule_fuzz.sh            # RULE_FUZZ_CASES (default 3000)
# Environment: PG_BINDIR (default: pg_config --bindir), RULE_FUZZ_CASES,
#   RULE_FUZZ_SEED (random seed, default 1), RULE_FUZZ_DIR (work dir).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PG_BINDIR=${PG_BINDIR:-$(${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config} --bindir)}
CASES=${RULE_FUZZ_CASES:-3000}
SEED=${RULE_FUZZ_SEED:-1}
WORK=${RULE_FUZZ_DIR:-/var/tmp/portal_sync-rulefuzz}
PORT=${RULE_FUZZ_PORT:-54341}

if [ "$(id -u)" -eq 0 ]; then
	rm -rf "$WORK"; mkdir -p "$WORK"; chown postgres "$WORK"
	exec runuser -u postgres -- env RULE_FUZZ_DIR="$WORK" PG_BINDIR="$PG_BINDIR" \
		RULE_FUZZ_CASES="$CASES" RULE_FUZZ_SEED="$SEED" RULE_FUZZ_PORT="$PORT" bash "$0" "$@"
fi
mkdir -p "$WORK"
DATA="$WORK/data"
rm -rf "$DATA"
"$PG_BINDIR/initdb" -D "$DATA" -A trust -E UTF8 --locale=C >"$WORK/initdb.log"
cat >>"$DATA/postgresql.conf" <<CONF
shared_preload_libraries = 'portal_sync'
listen_addresses = ''
unix_socket_directories = '$WORK'
port = $PORT
CONF
"$PG_BINDIR/pg_ctl" -D "$DATA" -l "$WORK/server.log" -w start >/dev/null
trap '"$PG_BINDIR/pg_ctl" -D "$DATA" -m immediate stop >/dev/null 2>&1 || true' EXIT
export PGHOST="$WORK" PGPORT="$PORT" PGDATABASE=postgres
"$PG_BINDIR/psql" -qX -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION portal_sync' \
	-f "$ROOT/test/reference_schema.sql" >/dev/null

start=$(date +%s)
python3 - "$HERE/corpus/rule_expr/seeds.txt" "$CASES" "$SEED" "$PG_BINDIR/psql" <<'PY'
import json, random, re, subprocess, sys
seeds = [l.rstrip('\n') for l in open(sys.argv[1]) if l.strip()]
cases, rng, psql = int(sys.argv[2]), random.Random(int(sys.argv[3])), sys.argv[4]
words = ["SELECT", "FROM", "ehr.patient", "(", ")", "'", "\"", ";", "::", "regclass",
         "AND", "OR", "NOT", "IN", "EXISTS", "CASE", "WHEN", "END", "ARRAY[", "]",
         "ROW(", "$1", "visit_note.*", "*", "LATERAL", "WITH", "VALUES (1)", "--", "/*",
         "table_to_xml(", "query_to_xml(", "pg_catalog.", "COLLATE \"C\"", "::text",
         "finalized", "note_type", "patient_id", "1", "NULL", "true", ",", "||", "E'\\\\"]
def toks(s): return re.findall(r"\w+|'[^']*'|\S", s)
def mutate():
    a = toks(rng.choice(seeds)); b = toks(rng.choice(seeds))
    op = rng.randrange(4)
    if op == 0: t = a[:rng.randint(0, len(a))] + b[rng.randint(0, len(b)):]
    elif op == 1:
        t = list(a)
        for _ in range(rng.randint(1, 3)): t.insert(rng.randint(0, len(t)), rng.choice(words))
    elif op == 2: t = a[:rng.randint(0, len(a))]
    else:
        t = list(a)
        if t: t[rng.randrange(len(t))] = rng.choice(words + b)
    return " ".join(t)
p = subprocess.Popen([psql, "-qXAt", "-v", "ON_ERROR_STOP=0"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
def q(s): return "'" + s.replace("'", "''") + "'"
accepted = checked = 0
bad = []
for i in range(cases):
    expr = seeds[i] if i < len(seeds) else mutate()
    col = rng.choice(["share_when", "enroll_when"])
    marker = f"@@done {i}"
    # a savepoint per case; on acceptance print the stored rule and the plan
    p.stdin.write(f"""BEGIN;
SELECT portal_sync.attach('ehr.visit_note','note','patient_id', {col} => {q(expr)});
SELECT 'ACC ' || {col} FROM portal_sync.sources WHERE source = 'ehr.visit_note'::regclass;
EXPLAIN (VERBOSE, FORMAT JSON) SELECT FROM ehr.visit_note WHERE {expr};
ROLLBACK;
SELECT {q(marker)};
""")
    out = []
    while True:
        line = p.stdout.readline()
        if line == "":
            print(f"rule_fuzz: server session died at case {i}: {expr!r}"); sys.exit(1)
        if line.strip() == marker: break
        out.append(line)
    text = "".join(out)
    if "ACC " not in text: continue
    accepted += 1
    plan = text[text.find("["):] if "[" in text else ""
    rels = set(re.findall(r'"Relation Name": "([^"]+)"', plan))
    if rels - {"visit_note"} or "SubPlan" in plan or "InitPlan" in plan or re.search(r"\bselect\b", expr, re.I) and "(SELECT" in plan:
        bad.append((expr, sorted(rels)))
    checked += 1
# stored node trees of everything accepted are checked in SQL by the plan
print(f"rule_fuzz: {cases} cases, {accepted} accepted, {len(bad)} accepted rules reading tables")
for e in bad[:20]: print("  READS TABLES:", e)
p.stdin.close(); p.wait()
sys.exit(1 if bad else 0)
PY
rc=$?
if grep -E 'terminated by signal|server process .* was terminated|ERROR: AddressSanitizer|runtime error:' "$WORK/server.log"; then
	echo "rule_fuzz: the server crashed (log $WORK/server.log)"; rc=1
fi
echo "rule_fuzz: $(( $(date +%s) - start ))s"
exit $rc
