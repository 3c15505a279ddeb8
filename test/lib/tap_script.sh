# Sourced by the scripts under test/ that run a Perl program against a
# throwaway PostgreSQL::Test::Cluster node, the way the TAP tests do
# (test/soak.sh, test/leakcheck.sh).  Run by root, the node and the
# program run as `postgres` (initdb refuses root); run by anyone else, as
# that user.  They use the installed portal_sync.
#
#   tap_script_init NAME
#       checks that portal_sync is installed in the PostgreSQL of PG_CONFIG
#       (default /usr/lib/postgresql/15/bin/pg_config) and that
#       PostgreSQL's TAP modules are there; defines as_pg (runs a command
#       as postgres when root); creates the work directory WORK
#       (${TMPDIR:-/tmp}/portal_sync-NAME.XXXXXX, owned by the user the
#       program runs as) holding a copy of test/.  Sets PG_CONFIG, BINDIR,
#       PGXS_PERL, WORK.  Fails (exit 1, message on stderr) otherwise.
#   tap_script_run [VAR=value...]
#       runs the Perl program read from stdin in WORK (through as_pg), with
#       PostgreSQL's TAP modules and test/lib on @INC, PATH starting with
#       the server's binaries, TESTDIR=WORK (so tmp_check/ is WORK's), and
#       the given environment.  Returns the exit code of perl.
#
# The caller sets SRC_DIR (top of the source tree) first.

tap_script_die() {
	echo "${TAP_SCRIPT_NAME:-tap_script}: $*" >&2
	exit 1
}

tap_script_init() {
	TAP_SCRIPT_NAME=$1
	PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
	[ -x "$PG_CONFIG" ] || tap_script_die "$PG_CONFIG not found (postgresql-server-dev-15)"
	BINDIR=$("$PG_CONFIG" --bindir)
	PGXS_PERL=$(dirname "$("$PG_CONFIG" --pgxs)")/../../src/test/perl
	[ -d "$PGXS_PERL" ] || tap_script_die "$PGXS_PERL missing (postgresql-server-dev-15)"
	[ -f "$("$PG_CONFIG" --pkglibdir)/portal_sync.so" ] &&
		[ -f "$("$PG_CONFIG" --sharedir)/extension/portal_sync.control" ] ||
		tap_script_die "portal_sync is not installed in $("$PG_CONFIG" --bindir | sed 's,/bin$,,'): install the package (README: Installing the package) or run 'make install' first"
	if [ "$(id -u)" -eq 0 ]; then
		id postgres >/dev/null 2>&1 || tap_script_die "no postgres user"
		as_pg() { runuser -u postgres -- "$@"; }
	else
		as_pg() { "$@"; }	# postgres, or any other user but root
	fi
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/portal_sync-$TAP_SCRIPT_NAME.XXXXXX")
	chmod 755 "$WORK"
	cp -r "$SRC_DIR/test" "$WORK/test"
	[ "$(id -u)" -ne 0 ] || chown -R postgres: "$WORK"
}

tap_script_run() {
	(
		cd "$WORK" &&
			as_pg env PATH="$BINDIR:$PATH" TESTDIR="$WORK" \
				PG_REGRESS="$(dirname "$("$PG_CONFIG" --pgxs)")/../../src/test/regress/pg_regress" \
				"$@" perl -I "$PGXS_PERL" -I "$WORK/test/lib" -
	)
}
