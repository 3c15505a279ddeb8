#!/usr/bin/env bash
# Fuzzing of the share_when/enroll_when validation (rule_expr_compile in
# src/rule_expr.c), in two phases on a throwaway server.  That code needs
# the backend's parser, analyzer and catalogs, so it is fuzzed inside a
# backend, ideally the sanitized one (SANITIZE_KEEP=1 bash test/sanitize.sh
# leaves its private installation; PG_BINDIR points at it, as
# test/memory-safety.sh does).
#
# 1. SQL level: each case is a seed of test/fuzz/corpus/rule_expr/seeds.txt
#    or a mutation (token splices of two seeds, insertions of keywords and
#    punctuation, truncations), tried as share_when or enroll_when of
#    ehr.visit_note through portal_sync.attach() in a transaction that is
#    rolled back.  Oracles: the server never crashes (the session survives
#    every case, no "terminated by signal" in the log); an accepted rule
#    never reads a table: EXPLAIN (VERBOSE, FORMAT JSON) of
#    "SELECT FROM ehr.visit_note WHERE <rule>" names no other relation and
#    has no SubPlan/InitPlan.
# 2. libFuzzer (coverage-guided): test/fuzz/fuzz_rule_expr.c, a loadable
#    module built by clang with -fsanitize=fuzzer-no-link and UBSan in trap
#    mode from the real src/rule_expr.c, runs LLVMFuzzerRunDriver inside a
#    single-user backend for RULE_FUZZ_SECONDS, from the same seeds and
#    test/fuzz/fuzz_rule_expr.dict.  Its oracles are in that file (crash,
#    internal error, an accepted rule reaching outside the row, stored form
#    not reading back).  A finding is saved as $RULE_FUZZ_DIR/crash-*.
#
#   bash test/fuzz/rule_fuzz.sh                         # both phases
#   RULE_FUZZ_SECONDS=3600 bash test/fuzz/rule_fuzz.sh  # a long libFuzzer run
#
# Environment: PG_BINDIR (default: pg_config --bindir), RULE_FUZZ_CASES
#   (phase 1, default 3000), RULE_FUZZ_SEED (phase 1 random seed, default 1),
#   RULE_FUZZ_SECONDS (phase 2, default 60), RULE_FUZZ_DIR (work dir),
#   CLANG (default clang-14).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PG_BINDIR=${PG_BINDIR:-$(${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config} --bindir)}
CASES=${RULE_FUZZ_CASES:-3000}
FUZZ_SECONDS=${RULE_FUZZ_SECONDS:-60}
CLANG=${CLANG:-$(command -v clang-14 || command -v clang)}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
SEED=${RULE_FUZZ_SEED:-1}
WORK=${RULE_FUZZ_DIR:-/var/tmp/portal_sync-rulefuzz}
PORT=${RULE_FUZZ_PORT:-54341}

if [ "$(id -u)" -eq 0 ]; then
	rm -rf "$WORK"; mkdir -p "$WORK"; chown postgres "$WORK"
	exec runuser -u postgres -- env RULE_FUZZ_DIR="$WORK" PG_BINDIR="$PG_BINDIR" \
		RULE_FUZZ_CASES="$CASES" RULE_FUZZ_SEED="$SEED" RULE_FUZZ_PORT="$PORT" \
		RULE_FUZZ_SECONDS="$FUZZ_SECONDS" CLANG="$CLANG" PG_CONFIG="$PG_CONFIG" bash "$0" "$@"
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
# The plan of a rule, with the rule passed as a quoted literal: a rule text
# with an unbalanced quote or comment must not swallow the next commands.
"$PG_BINDIR/psql" -qX -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
CREATE FUNCTION rule_plan(rule text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE plan text;
BEGIN
	EXECUTE 'EXPLAIN (VERBOSE, FORMAT JSON) SELECT FROM ehr.visit_note WHERE ' || rule INTO plan;
	RETURN plan;
END $f$;
SQL

start=$(date +%s)
rc=0
python3 - "$HERE/corpus/rule_expr/seeds.txt" "$CASES" "$SEED" "$PG_BINDIR/psql" <<'PY' || rc=$?
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
SELECT rule_plan({q(expr)});
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
if grep -E 'terminated by signal|server process .* was terminated|ERROR: AddressSanitizer|runtime error:' "$WORK/server.log"; then
	echo "rule_fuzz: the server crashed (log $WORK/server.log)"; rc=1
fi
echo "rule_fuzz: SQL level $(( $(date +%s) - start ))s"

# ---- phase 2: libFuzzer inside a single-user backend
start=$(date +%s)
FUZZER_RT=$("$CLANG" -print-file-name=libclang_rt.fuzzer_no_main-x86_64.a)
[ -f "$FUZZER_RT" ] || { echo "rule_fuzz: $FUZZER_RT missing (libclang-rt-14-dev)"; exit 1; }
# -Bsymbolic: the module calls its own instrumented rule_expr_compile, never
# the one of a loaded portal_sync.so.
"$CLANG" -fPIC -shared -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer-no-link \
	-fsanitize=undefined -fsanitize-trap=undefined -Wall -Werror -Wno-unused-parameter \
	-Wno-ignored-attributes -I"$("$PG_CONFIG" --includedir-server)" -I"$ROOT/src" \
	$(pkg-config --cflags libcurl json-c) "$ROOT/src/rule_expr.c" "$HERE/fuzz_rule_expr.c" \
	"$FUZZER_RT" -lstdc++ -Wl,-Bsymbolic -o "$WORK/fuzz_rule_expr.so"
"$PG_BINDIR/psql" -qX -v ON_ERROR_STOP=1 -c "CREATE FUNCTION portal_sync_fuzz_rule_expr(regclass, text[])
	RETURNS bigint AS '$WORK/fuzz_rule_expr.so' LANGUAGE C STRICT" >/dev/null
"$PG_BINDIR/pg_ctl" -D "$DATA" -m fast stop >/dev/null
trap - EXIT
mkdir -p "$WORK/corpus"
python3 - "$HERE/corpus/rule_expr/seeds.txt" "$WORK/corpus" <<'PY'
import sys, os
for i, line in enumerate(l.rstrip('\n') for l in open(sys.argv[1]) if l.strip()):
    open(os.path.join(sys.argv[2], f"seed-{i:03d}"), "w").write(line)
PY
# -timeout: libFuzzer's SIGALRM handler replaces PostgreSQL's, which a
# single-user backend with no statement or lock timeouts does not need.
# -rss_limit_mb=0: no RSS-watching thread inside the backend.
fuzz_args="'-max_total_time=$FUZZ_SECONDS','-timeout=10','-rss_limit_mb=0','-max_len=512',
	'-dict=$HERE/fuzz_rule_expr.dict','-artifact_prefix=$WORK/','-print_final_stats=1','$WORK/corpus'"
fuzz_rc=0
echo "SELECT portal_sync_fuzz_rule_expr('ehr.visit_note', ARRAY[$(echo $fuzz_args)])" |
	"$PG_BINDIR/postgres" --single -D "$DATA" -c shared_preload_libraries= -c log_min_messages=fatal \
		postgres >"$WORK/libfuzzer.out" 2>"$WORK/libfuzzer.log" || fuzz_rc=$?
grep -E 'FINDING|ERROR|SUMMARY|Test unit written|^stat::number_of_executed_units|DONE|rules accepted' \
	"$WORK/libfuzzer.log" | tail -n 12
if [ "$fuzz_rc" -ne 0 ] || ! grep -q 'rules accepted' "$WORK/libfuzzer.log"; then
	echo "rule_fuzz: libFuzzer finding or failure (exit $fuzz_rc, log $WORK/libfuzzer.log)"
	rc=1
fi
echo "rule_fuzz: libFuzzer $(( $(date +%s) - start ))s, corpus $(ls "$WORK/corpus" | wc -l) files"
exit $rc
