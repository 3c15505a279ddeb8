
# Copyright (c) 2026, portal_sync developers
#
# Security lines of SPEC 2, 3, 6 from the outside:
# - the token is never shown to other roles (SHOW, current_setting,
#   pg_settings, pg_file_settings), not even to a monitoring role (pg_monitor);
# - a non-superuser reads nothing in schema portal_sync (outbox, settings,
#   logs, dead letters...) and calls none of its functions;
# - an EHR writer role needs no grant: its writes are captured and delivered;
# - a hostile search_path and same-named objects (in public and in a schema
#   first on the path, for the writer's session and for the database, which
#   the worker inherits) change nothing the triggers or the worker do;
# - share_when/enroll_when cannot run statements or read other tables, nor
#   see the token.
# The token is in postgresql.conf before the start (a SIGHUP reload would
# make PostgreSQL core log its new value).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $token = 'tok-S3CRET-4711-zz';
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('security', $portal, conf => qq{
portal_sync.auth_token = '$token'
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }
$portal->mode({ mode => 'require_token', token => $token });

one(q{
CREATE ROLE clerk LOGIN;
GRANT USAGE ON SCHEMA ehr TO clerk;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA ehr TO clerk;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA ehr TO clerk;
CREATE ROLE monitor LOGIN IN ROLE pg_monitor;
CREATE ROLE nobody LOGIN;
-- An old-style database: everybody may create in public.
GRANT CREATE ON SCHEMA public TO clerk;
CREATE SCHEMA evil AUTHORIZATION clerk;
SELECT pstest.make_patient(i, 1) FROM generate_series(1, 6) i;
SELECT pstest.book(i) FROM generate_series(1, 3) i;
});
ok(ps_wait_drained($node, $db), 'initial drain (token accepted)');

# Runs sql as role; returns (ret, stdout, stderr).
sub as
{
	my ($role, $sql) = @_;
	return $node->psql($db, $sql, connstr => $node->connstr($db) . " user=$role", on_error_stop => 1);
}

# ---------------------------------------------------------------- the token
for my $role (qw(clerk monitor nobody))
{
	for my $q (
		'SHOW portal_sync.auth_token',
		q{SELECT current_setting('portal_sync.auth_token')},
		q{SELECT current_setting('portal_sync.auth_token', true)},
		q{SELECT setting, reset_val, boot_val FROM pg_settings WHERE name = 'portal_sync.auth_token'},
		q{SELECT * FROM pg_file_settings WHERE name = 'portal_sync.auth_token'},
		q{SELECT pg_read_file('postgresql.conf')},
		q{SELECT name, setting FROM pg_show_all_settings() WHERE name LIKE 'portal_sync.%'},
		q{SELECT * FROM pg_show_all_file_settings()})
	{
		my ($ret, $out, $err) = as($role, $q);
		unlike("$out $err", qr/\Q$token\E/, "$role: $q does not show the token");
	}
}
my ($ret, $out, $err) = as('monitor', 'SHOW portal_sync.auth_token');
note("SHOW portal_sync.auth_token as pg_monitor member: ret $ret, '$out' $err");

# ---------------------------------------------------------------- schema portal_sync
my @tables = qw(outbox settings enrollment installation resync_queue dead_letter
  delivery_log skipped_row source sources status patients dead_letters);
my @funcs = (
	q{portal_sync.enroll('4')}, q{portal_sync.resync_patient('1')}, q{portal_sync.resync_all()},
	q{portal_sync.retry_dead_letters()}, q{portal_sync.is_ready('1')}, q{portal_sync.wait_ready('1', '1s')},
	q{* FROM portal_sync.explain('1')}, q{portal_sync.attach('ehr.pin', 'clinical', 'patient_id')},
	q{portal_sync.detach('ehr.medication')}, q{portal_sync.start_worker()},
	q{* FROM portal_sync.worker_status()});
for my $role (qw(clerk monitor))
{
	for my $t (@tables)
	{
		my ($r, $o, $e) = as($role, "SELECT * FROM portal_sync.$t LIMIT 1");
		isnt($r, 0, "$role cannot read portal_sync.$t");
	}
	my ($r, $o, $e) = as($role, q{UPDATE portal_sync.settings SET max_privacy_level = 4});
	isnt($r, 0, "$role cannot change the settings");
	for my $f (@funcs)
	{
		my ($r, $o, $e) = as($role, "SELECT $f");
		isnt($r, 0, "$role cannot call $f");
		like($e, qr/permission denied/, "  ($f: permission denied)") if $r;
	}
}
is(one(q{SELECT max_privacy_level FROM portal_sync.settings}), '0', 'settings unchanged');
is(one(q{SELECT count(*) FROM portal_sync.enrollment WHERE patient_id = '4'}), '0', 'nobody enrolled by the attempts');

# ---------------------------------------------------------------- hostile objects
# Spies: functions and operators named like what SQL unqualified might
# resolve to, and tables named like portal_sync's, in evil (first on the
# path) and public.  Each records its call in evil.calls.
($ret, $out, $err) = as('clerk', q{
CREATE TABLE evil.calls (what text, by_role text, at timestamptz DEFAULT pg_catalog.now());
GRANT INSERT ON evil.calls TO PUBLIC;
DO $do$
DECLARE
	s text;
	t text;
	f record;
BEGIN
	FOREACH s IN ARRAY ARRAY['evil', 'public'] LOOP
		FOREACH t IN ARRAY ARRAY['outbox', 'settings', 'source', 'enrollment', 'installation',
								 'resync_queue', 'dead_letter', 'delivery_log', 'skipped_row',
								 'medication', 'patient', 'allergy', 'appointment'] LOOP
			EXECUTE format('CREATE TABLE %I.%I (patient_id text, seq bigint, source_id int, op "char", keys text[], captured_at timestamptz, x text)', s, t);
			EXECUTE format('GRANT ALL ON %I.%I TO PUBLIC', s, t);
		END LOOP;
		FOR f IN SELECT * FROM (VALUES
				('now', '', 'timestamptz', 'pg_catalog.now()'),
				('current_database', '', 'name', 'pg_catalog.current_database()'),
				('clock_timestamp', '', 'timestamptz', 'pg_catalog.clock_timestamp()'),
				('statement_timestamp', '', 'timestamptz', 'pg_catalog.statement_timestamp()'),
				('nextval', 'regclass', 'bigint', 'pg_catalog.nextval($1)'),
				('cardinality', 'anyarray', 'int', 'pg_catalog.cardinality($1)'),
				('array_length', 'anyarray, int', 'int', 'pg_catalog.array_length($1, $2)'),
				('coalesce_', 'text', 'text', '$1'),
				('jsonb_build_object', 'VARIADIC "any"', 'jsonb', 'NULL'),
				('to_jsonb', 'anyelement', 'jsonb', 'pg_catalog.to_jsonb($1)'),
				('to_json', 'anyelement', 'json', 'pg_catalog.to_json($1)'),
				('row_to_json', 'record', 'json', 'pg_catalog.row_to_json($1)'),
				('lower', 'text', 'text', 'pg_catalog.lower($1)'),
				('upper', 'text', 'text', 'pg_catalog.upper($1)'),
				('textin', 'cstring', 'text', 'NULL'),
				('unnest', 'anyarray', 'SETOF anyelement', 'pg_catalog.unnest($1)'),
				('format', 'text, VARIADIC "any"', 'text', 'NULL'),
				('txid_current', '', 'bigint', 'pg_catalog.txid_current()'),
				('pg_current_xact_id', '', 'xid8', 'pg_catalog.pg_current_xact_id()'),
				('gen_random_uuid', '', 'uuid', 'pg_catalog.gen_random_uuid()'),
				('date', 'timestamptz', 'date', '$1::pg_catalog.date'),
				('int4eq', 'int, int', 'bool', 'pg_catalog.int4eq($1, $2)'),
				('texteq', 'text, text', 'bool', 'pg_catalog.texteq($1, $2)'),
				('int8eq', 'bigint, bigint', 'bool', 'pg_catalog.int8eq($1, $2)'),
				('int4le', 'int, int', 'bool', 'pg_catalog.int4le($1, $2)'),
				('textne', 'text, text', 'bool', 'pg_catalog.textne($1, $2)'),
				('date_ge', 'date, date', 'bool', 'pg_catalog.date_ge($1, $2)'),
				('int4in', 'cstring', 'int', 'NULL'))
			AS v(name, args, rettype, body) LOOP
			IF f.args LIKE '%"any"%' OR f.body = 'NULL' THEN
				CONTINUE;	-- cannot be written in SQL; skipped
			END IF;
			EXECUTE format($f$CREATE FUNCTION %I.%I(%s) RETURNS %s LANGUAGE plpgsql AS $b$
				BEGIN
					INSERT INTO evil.calls (what, by_role) VALUES (%L, current_user);
					RETURN %s;
				END $b$$f$, s, f.name, f.args, f.rettype, s || '.' || f.name,
				CASE WHEN f.rettype LIKE 'SETOF%' THEN 'QUERY SELECT ' || f.body ELSE f.body END);
		END LOOP;
		-- Operators that shadow pg_catalog's when the schema comes first.
		EXECUTE format('CREATE OPERATOR %I.= (LEFTARG = int, RIGHTARG = int, FUNCTION = %I.int4eq)', s, s);
		EXECUTE format('CREATE OPERATOR %I.= (LEFTARG = text, RIGHTARG = text, FUNCTION = %I.texteq)', s, s);
		EXECUTE format('CREATE OPERATOR %I.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = %I.int8eq)', s, s);
		EXECUTE format('CREATE OPERATOR %I.<= (LEFTARG = int, RIGHTARG = int, FUNCTION = %I.int4le)', s, s);
		EXECUTE format('CREATE OPERATOR %I.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = %I.textne)', s, s);
		EXECUTE format('CREATE OPERATOR %I.>= (LEFTARG = date, RIGHTARG = date, FUNCTION = %I.date_ge)', s, s);
	END LOOP;
END
$do$;
});
is($ret, 0, 'the clerk planted same-named tables, functions and operators in evil and public') or diag($err);
sub calls { return one(q{SELECT coalesce(string_agg(DISTINCT what || ' by ' || by_role, ', '), '') FROM evil.calls}) }
sub spy_rows
{
	return one(q{SELECT (SELECT count(*) FROM evil.outbox) + (SELECT count(*) FROM public.outbox)
		+ (SELECT count(*) FROM evil.enrollment) + (SELECT count(*) FROM public.enrollment)
		+ (SELECT count(*) FROM evil.skipped_row) + (SELECT count(*) FROM public.skipped_row)});
}
# The spies work (when called on purpose).
($ret) = as('clerk', q{SET search_path = evil, pg_catalog; SELECT now(); SELECT 1 = 1; DELETE FROM evil.calls;});
is($ret, 0, 'spies callable');

# The clerk writes with the hostile path, in every way the EHR does.  Its
# own statements name pg_catalog's operators (OPERATOR(pg_catalog.=)), so
# that any spy call comes from portal_sync's triggers or worker.
my $mark = ps_nreq($portal);
($ret, $out, $err) = as('clerk', q{
SET search_path = evil, pg_catalog, public;
BEGIN;
INSERT INTO ehr.appointment (patient_id, provider, starts_at) VALUES (4, 'Dr. Path', '2026-12-01 12:00+00');
INSERT INTO ehr.medication (patient_id, drug_name, start_date, privacy_level) VALUES (4, 'path drug', '2025-01-01', 0), (1, 'path drug 2', '2025-01-01', 3);
UPDATE ehr.medication SET dose = 'path dose' WHERE patient_id OPERATOR(pg_catalog.=) ANY ('{1,2}');
UPDATE ehr.allergy SET privacy_level = 2 WHERE patient_id OPERATOR(pg_catalog.=) 2;
DELETE FROM ehr.problem WHERE patient_id OPERATOR(pg_catalog.=) 3;
INSERT INTO ehr.lab_result (patient_id, test_name, status, result_date) VALUES (NULL, 'unmatched', 'final', '2025-01-01');
UPDATE ehr.visit_note SET finalized = true WHERE patient_id OPERATOR(pg_catalog.=) 5;
INSERT INTO ehr.pin (patient_id, pin, generated_by) VALUES (6, '1234', 'OP');
INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (6, 'Path Payer', 'PP6');
UPDATE ehr.patient SET privacy_level = 1 WHERE patient_id OPERATOR(pg_catalog.=) 3;
COMMIT;
});
is($ret, 0, 'the clerk\'s writes with a hostile search_path succeed (no grant on portal_sync needed)') or diag($err);
ps_check_settled($node, $db, $portal, 'writes under a hostile search_path', since => $mark);
is(calls(), '', 'no spy function or operator was called by the triggers or the worker');
is(spy_rows(), '0', 'nothing written to same-named tables');
is(one(q{SELECT string_agg(patient_id, ',' ORDER BY patient_id) FROM portal_sync.enrollment}), '1,2,3,4,5,6',
	'initiating events under the hostile path enrolled 4 (appointment), 5 (note), 6 (pin)');

# The worker inherits database and role settings: a hostile search_path
# there, a restart, and more changes.
one(q{ALTER DATABASE postgres SET search_path = evil, pg_catalog, public;
	  ALTER ROLE CURRENT_USER SET search_path = evil, pg_catalog, public;});
$node->restart;
# The test's own sessions (checks, pstest) keep a clean path; the worker
# gets the hostile defaults.
$ENV{PGOPTIONS} = '-c search_path=pg_catalog,public';
is(one(q{SELECT setting FROM pg_settings WHERE name = 'search_path'}), 'pg_catalog,public', 'test sessions: clean path');
ok(ps_wait_until(sub { ps_worker_pid($node, $db) }, 'worker', 60), 'worker restarted with the hostile defaults');
$mark = ps_nreq($portal);
($ret, $out, $err) = as('clerk', q{
SET search_path = evil, pg_catalog, public;
UPDATE ehr.medication SET frequency = 'QID', privacy_level = 0 WHERE patient_id OPERATOR(pg_catalog.=) ANY ('{1,4}');
UPDATE ehr.immunization SET privacy_level = 1 WHERE patient_id OPERATOR(pg_catalog.=) 2;
INSERT INTO ehr.vital_sign (patient_id, measured_at, pulse) VALUES (5, '2025-06-01 12:00', 99);
UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id OPERATOR(pg_catalog.=) 3;
});
is($ret, 0, 'clerk writes with the hostile database default') or diag($err);
# The administrator too (resync_all, settings) under the hostile path.
($ret, $out, $err) = $node->psql($db, q{SET search_path = evil, pg_catalog, public; UPDATE settings SET x = 'y'; UPDATE portal_sync.settings SET max_privacy_level = 1; SELECT portal_sync.resync_all(); SELECT portal_sync.resync_patient('2'); SELECT * FROM portal_sync.explain('3');});
is($ret, 0, 'admin functions under the hostile path') or diag($err);
ps_check_settled($node, $db, $portal, 'worker with a hostile database search_path', since => $mark);
is(calls(), '', 'still no spy called');
is(spy_rows(), '0', 'still nothing written to same-named tables');
one(q{ALTER DATABASE postgres RESET search_path; ALTER ROLE CURRENT_USER RESET search_path;});
delete $ENV{PGOPTIONS};

# ---------------------------------------------------------------- rules cannot run statements
one(q{CREATE FUNCTION public.spy_bool(text) RETURNS boolean IMMUTABLE LANGUAGE sql AS $$ SELECT true $$;
	  CREATE DOMAIN public.spy_dom AS text CHECK (public.spy_bool(VALUE));});
for my $rule (
	q{true; DROP TABLE ehr.pin},
	q{true) OR (SELECT true},
	q{(SELECT count(*) FROM portal_sync.settings) > 0},
	q{EXISTS (SELECT 1 FROM ehr.patient)},
	q{pg_sleep(0) IS NOT NULL},
	q{public.spy_bool(status)},
	q{status::public.spy_dom IS NOT NULL},
	q{query_to_xml('DELETE FROM ehr.pin RETURNING 1', true, true, '') IS NOT NULL},
	q{table_to_xml('portal_sync.settings', true, true, '') IS NOT NULL},
	q{pg_read_file('postgresql.conf') <> ''},
	q{nextval('portal_sync.outbox_seq') > 0},
	q{lo_import('/etc/passwd') > 0},
	q{set_config('search_path', 'evil', false) <> ''},
	q{pg_terminate_backend(1) IS NULL},
	q{current_setting('portal_sync.auth_token') <> ''} . q{ AND pg_sleep(1) IS NULL})
{
	for my $which (qw(share_when enroll_when))
	{
		my $kind = $which eq 'share_when' ? 'clinical' : 'note';
		my $tbl = $which eq 'share_when' ? 'ehr.medication' : 'ehr.visit_note';
		(my $r = $rule) =~ s/'/''/g;
		my ($ret, $out, $err) = $node->psql($db,
			"SELECT portal_sync.attach('$tbl', '$kind', 'patient_id', $which => '$r')");
		isnt($ret, 0, "$which refused: $rule");
	}
}
is(one(q{SELECT count(*) FROM ehr.pin}), '1', 'no rule ran a statement');
is(one(q{SELECT share_when FROM portal_sync.sources WHERE name = 'medication'}), q{(status <> 'entered_in_error'::text)},
	'refused attaches left the source as it was');

# A rule is "over the row's own columns only" (SPEC 3): it cannot observe
# the token either.  A non-superuser who owns an EHR table and was granted
# EXECUTE on attach() (the design allows it: attach runs as the extension's
# owner) attaches it with rules comparing current_setting() of the token
# with a guess; the worker evaluates them as superuser.  If the right guess
# and the wrong one give different results, the token leaks bit by bit.
one(q{CREATE ROLE tabowner LOGIN;
	  CREATE SCHEMA own AUTHORIZATION tabowner;
	  GRANT USAGE ON SCHEMA portal_sync TO tabowner;
	  GRANT EXECUTE ON FUNCTION portal_sync.attach(regclass, text, name, name, name, name, text, text, text, name[]) TO tabowner;});
my @probe;
for my $guess ([ 'right', substr($token, 0, 5) ], [ 'wrong', 'zzzzz' ])
{
	my ($name, $prefix) = @$guess;
	my ($r, $o, $e) = as('tabowner', qq{
CREATE TABLE own.probe_$name (id int PRIMARY KEY, patient_id int, label text);
CREATE INDEX ON own.probe_$name (patient_id);
SELECT portal_sync.attach('own.probe_$name', 'clinical', 'patient_id',
	share_when => 'current_setting(''portal_sync.auth_token'', true) LIKE ''$prefix%''');
INSERT INTO own.probe_$name VALUES (1, 1, 'probe');
});
	push @probe, [ $name, $r, $e ];
}
ok(ps_wait_drained($node, $db), 'probes drained');
my $items = ps_portal_items($portal, $db);
my %got = map { $_->[0] => ($items->{1}{"probe_$_->[0]"} ? 'shared' : 'withheld') } @probe;
note("probe attaches: " . join('; ', map { "$_->[0]: ret $_->[1] $_->[2]" } @probe));
ok($probe[0][1] != 0 || $got{right} eq $got{wrong},
	"a rule cannot tell the token from a wrong guess (right guess: $got{right}, wrong guess: $got{wrong})");
# Cleaned up: rows deleted (a delete is sent), then detached.
as('tabowner', 'DELETE FROM own.probe_right; DELETE FROM own.probe_wrong;');
ok(ps_wait_drained($node, $db), 'probe rows deleted');
for my $name (qw(right wrong))
{
	$node->psql($db, "SELECT portal_sync.detach('own.probe_$name')");
}

# ---------------------------------------------------------------- insecure http
# Plain http:// to a non-loopback host is refused before any connection,
# also when the URL tries to look like loopback.  A plain portal listens on
# this machine's non-loopback address (if it has one), so that a request
# wrongly allowed would arrive there.
my ($ip) = grep { $_ !~ /^127\./ && $_ !~ /:/ } split /\s+/, `hostname -I 2>/dev/null` // '';
my $plain = $ip ? PortalSyncTest::Portal->start(host => '0.0.0.0') : undef;
my $target = $ip ? "$ip:" . $plain->port : '192.0.2.77:9';
note("non-loopback target: $target");
for my $url ("http://$target/events", "http://127.0.0.1\@$target/events",
	"http://localhost\@$target/events", "http://$target/127.0.0.1/events",
	"http://$target/events#\@127.0.0.1", "HTTP://$target/events", "http:$target/events")
{
	my $before = ps_status($node, $db)->{last_error_at} // '';
	ps_set_conf($node, 'portal_sync.endpoint' => $url);
	one(q{UPDATE ehr.medication SET route = 'oral ' || med_id WHERE patient_id = 1});
	ok(ps_wait_until(sub {
				my $s = ps_status($node, $db);
				($s->{last_error_at} // '') ne $before && ($s->{last_error} // '') =~ /loopback|insecure|not a valid URL/i
			}, "refusal of $url", 20),
		"refused (insecure or invalid): $url")
	  or diag('last_error: ' . (ps_status($node, $db)->{last_error} // 'NULL'));
	ps_set_conf($node, 'portal_sync.endpoint' => $portal->url . '/events');
	ok(ps_wait_drained($node, $db), "back to the portal after $url");
}
if ($plain)
{
	is(scalar @{ $plain->requests }, 0, 'nothing reached the plain portal on the non-loopback address');
	$plain->stop;
}

ps_check_settled($node, $db, $portal, 'security: the end');
$node->stop;
$portal->stop;
done_testing();
