
# Copyright (c) 2026, portal_sync developers

=pod

=head1 NAME

PortalSyncTest - shared helpers of portal_sync's TAP tests

=head1 SYNOPSIS

  use FindBin;
  use lib "$FindBin::RealBin/../lib";
  use PortalSyncTest;

  my $portal = PortalSyncTest::Portal->start;
  my $node = ps_new_node('main', $portal);       # preloaded, extension +
                                                 # reference schema attached
  $node->safe_psql('postgres', "INSERT INTO ehr.appointment ...");
  ps_wait_drained($node, 'postgres');
  ps_compare_state($node, 'postgres', $portal, 'after enrollment');
  ps_check_portal_invariants($portal, 'after enrollment');

=head1 DESCRIPTION

Starts the local portal (test/portal/portal.py) on a free loopback port,
talks to its control API, creates nodes configured for it, and compares the
portal's state with the shareable state computed from the database (SPEC
section 4) -- the "nothing lost" oracle of the delivery tests.

=cut

package PortalSyncTest;

use strict;
use warnings;

use Carp;
use Exporter 'import';
use File::Basename qw(dirname);
use File::Spec;
use Cwd qw(abs_path);
use JSON::PP;
use Time::HiRes qw(usleep time);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our @EXPORT = qw(
  ps_root ps_new_node ps_setup_db ps_sql_json ps_sql_row ps_status
  ps_query ps_wait_drained ps_wait_until ps_expected_items ps_portal_items
  ps_compare_state ps_check_portal_invariants ps_worker_pid ps_kill_worker
  ps_dead_letters ps_set_conf ps_enrolled ps_accepted_events
  ps_check_ccda_after_snapshot ps_check_event_ids_stable ps_events
  ps_check_send_order
);

# allow_bignum: row data may hold numbers beyond double precision.
our $JSON = JSON::PP->new->canonical(1)->allow_nonref(1)->allow_bignum(1);

# Top of the source tree (test/lib/../..).
sub ps_root
{
	return abs_path(File::Spec->catdir(dirname(__FILE__), '..', '..'));
}

# Default time limit of the waits, in seconds.
our $WAIT = $ENV{PORTAL_SYNC_TEST_WAIT} || 90;

=pod

=head2 ps_wait_until(sub, description, [timeout])

Polls sub every 0.1 s until it returns true; returns its last value (false
on timeout, with a diag).

=cut

sub ps_wait_until
{
	my ($cond, $what, $timeout) = @_;
	$timeout //= $WAIT;
	my $deadline = time() + $timeout;
	my $v;
	while (1)
	{
		$v = eval { $cond->() };
		return $v if $v;
		last if time() > $deadline;
		usleep(100_000);
	}
	diag("timed out after ${timeout}s waiting for: $what"
		  . ($@ ? " (last error: $@)" : ''));
	return $v;
}

=pod

=head2 ps_new_node(name, portal, [conf => text], [db => name], [no_setup => 1], [endpoint => url], [init => {init options}])

A new initialized and started node with the library preloaded, the endpoint
pointing at the portal, a short retry cap and HTTP timeout.  Unless no_setup,
the extension, the reference schema and its attachments are created in db
(default postgres).

=cut

sub ps_new_node
{
	my ($name, $portal, %opt) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	# UTF8, so that any text an EHR stores can be tested.
	$node->init(extra => [ '--encoding=UTF8', '--locale=C' ], %{ $opt{init} || {} });
	my $endpoint = $opt{endpoint}
	  // ($portal ? $portal->url . '/events' : '');
	$node->append_conf(
		'postgresql.conf', qq{
shared_preload_libraries = 'portal_sync'
portal_sync.endpoint = '$endpoint'
portal_sync.retry_max_delay = '2s'
portal_sync.http_timeout = '2s'
log_line_prefix = '%m [%p] %b %d '
});
	$node->append_conf('postgresql.conf', $opt{conf}) if $opt{conf};
	$node->start;
	ps_setup_db($node, $opt{db} // 'postgres') unless $opt{no_setup};
	return $node;
}

=pod

=head2 ps_setup_db(node, db)

CREATE EXTENSION portal_sync, the reference EHR schema, its attachments and
the test's helper functions (schema pstest) in db.

=cut

sub ps_setup_db
{
	my ($node, $db) = @_;
	my $root = ps_root();
	$node->safe_psql($db, 'CREATE EXTENSION portal_sync');
	$node->safe_psql($db,
		slurp_file("$root/test/reference_schema.sql"));
	$node->safe_psql($db,
		slurp_file("$root/test/attach_reference.sql"));
	$node->safe_psql($db, $PortalSyncTest::HELPER_SQL);
	return;
}

# Oracle of SPEC section 4, computed from the database alone.
our $HELPER_SQL = <<'EOSQL';
CREATE SCHEMA pstest;

-- Every item that should be on the portal now: for enrolled patients, every
-- row of every attached source passing the date cutoff, the privacy level,
-- its share_when and the chart's privacy; insurance rows of every patient
-- (chart rule included).
CREATE TYPE pstest.item_key AS (p text, k text);
CREATE FUNCTION pstest.expected_items()
RETURNS TABLE(patient_id text, source text, key text)
LANGUAGE plpgsql AS $fn$
DECLARE
	s record;
	r record;
	found pstest.item_key[];
	one_row pstest.item_key[];
	st record;
	chart record;
	q text;
BEGIN
	SELECT * INTO st FROM portal_sync.settings;
	SELECT v.source, v.patient_col, v.privacy_col INTO chart
	  FROM portal_sync.sources v WHERE v.kind = 'patient';
	FOR s IN SELECT * FROM portal_sync.sources LOOP
		q := format('SELECT portal_sync.value_text(t.%I), portal_sync.value_text(t.%I) FROM %s t WHERE t.%I IS NOT NULL',
					s.patient_col, s.key_col, s.source, s.patient_col);
		IF s.date_col IS NOT NULL AND st.date_cutoff IS NOT NULL THEN
			q := q || format(' AND (t.%I IS NULL OR t.%I::date >= %L::date)',
							 s.date_col, s.date_col, st.date_cutoff);
		END IF;
		IF s.privacy_col IS NOT NULL THEN
			q := q || format(' AND coalesce(t.%I, 0) <= %s',
							 s.privacy_col, st.max_privacy_level);
		END IF;
		IF s.share_when IS NOT NULL THEN
			-- $1: the one row to look at when the rule fails on some row
			q := q || format(' AND CASE WHEN $1 IS NULL OR portal_sync.value_text(t.%I) = $1 THEN coalesce((%s), false) END',
							 s.key_col, s.share_when);
		END IF;
		IF s.kind <> 'insurance' THEN
			q := q || format(' AND EXISTS (SELECT 1 FROM portal_sync.patients e'
							 ' WHERE e.patient_id = portal_sync.value_text(t.%I))', s.patient_col);
		END IF;
		IF chart.source IS NOT NULL THEN
			IF chart.privacy_col IS NOT NULL THEN
				q := q || format(' AND EXISTS (SELECT 1 FROM %s c WHERE c.%I = t.%I'
								 ' AND coalesce(c.%I, 0) <= %s)',
								 chart.source, chart.patient_col, s.patient_col,
								 chart.privacy_col, st.max_privacy_level);
			ELSE
				q := q || format(' AND EXISTS (SELECT 1 FROM %s c WHERE c.%I = t.%I)',
								 chart.source, chart.patient_col, s.patient_col);
			END IF;
		END IF;
		BEGIN
			EXECUTE format('SELECT array_agg(ROW(x.p, x.k)::pstest.item_key) FROM (%s) x(p, k)', q)
				INTO found USING NULL::text;
		EXCEPTION WHEN OTHERS THEN
			-- share_when fails on some row (SPEC 4): that row is not
			-- shareable; the others are, row by row
			found := NULL;
			FOR r IN EXECUTE format('SELECT portal_sync.value_text(t.%I) AS k FROM %s t', s.key_col, s.source) LOOP
				BEGIN
					EXECUTE format('SELECT array_agg(ROW(x.p, x.k)::pstest.item_key) FROM (%s) x(p, k)', q)
						INTO one_row USING r.k;
					found := found || one_row;
				EXCEPTION WHEN OTHERS THEN
					NULL;
				END;
			END LOOP;
		END;
		RETURN QUERY SELECT f.p, s.name::text, f.k FROM unnest(found) f;
	END LOOP;
END
$fn$;

-- Items of one source as the portal holds them ({key: data}) that differ
-- from the row in the database: the key and the names of the differing
-- columns (the data is read back with jsonb_populate_record, so any JSON
-- spelling of a value the column type accepts compares equal).  For a
-- source with a columns list, the data must hold exactly those columns.
CREATE FUNCTION pstest.mismatched(src text, items jsonb)
RETURNS TABLE(key text, problem text)
LANGUAGE plpgsql AS $fn$
DECLARE
	s record;
BEGIN
	SELECT * INTO s FROM portal_sync.sources v WHERE v.name = src;
	IF NOT FOUND THEN
		RETURN QUERY SELECT i.key, 'unknown source'::text FROM jsonb_each(items) i;
		RETURN;
	END IF;
	IF s.columns IS NOT NULL THEN
		RETURN QUERY EXECUTE format($q$
			SELECT i.key,
				   CASE WHEN t.%2$I IS NULL THEN 'no such row'
				   WHEN NOT (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(i.value) k)
							= (SELECT array_agg(c::text ORDER BY c::text) FROM unnest($2) c)
				   THEN 'columns sent are not the columns list: '
						|| (SELECT string_agg(k, ',' ORDER BY k) FROM jsonb_object_keys(i.value) k)
				   ELSE 'columns differ: ' || (
					 SELECT string_agg(a.key, ',' ORDER BY a.key)
					 FROM jsonb_each(to_jsonb(jsonb_populate_record(NULL::%1$s, i.value))) a
					 JOIN jsonb_each(to_jsonb(t)) b USING (key)
					 WHERE a.value IS DISTINCT FROM b.value AND a.key = ANY ($2::text[]))
				   END
			FROM jsonb_each($1) i
			LEFT JOIN %1$s t ON portal_sync.value_text(t.%2$I) = i.key
			WHERE t.%2$I IS NULL
			   OR NOT (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(i.value) k)
					  = (SELECT array_agg(c::text ORDER BY c::text) FROM unnest($2) c)
			   OR EXISTS (SELECT 1
						  FROM jsonb_each(to_jsonb(jsonb_populate_record(NULL::%1$s, i.value))) a
						  JOIN jsonb_each(to_jsonb(t)) b USING (key)
						  WHERE a.value IS DISTINCT FROM b.value AND a.key = ANY ($2::text[]))$q$,
			s.source, s.key_col) USING items, s.columns;
		RETURN;
	END IF;
	RETURN QUERY EXECUTE format($q$
		SELECT i.key,
			   CASE WHEN t.%2$I IS NULL THEN 'no such row'
			   ELSE 'columns differ: ' || (
				 SELECT string_agg(a.key, ',' ORDER BY a.key)
				 FROM jsonb_each(to_jsonb(jsonb_populate_record(NULL::%1$s, i.value))) a
				 JOIN jsonb_each(to_jsonb(t)) b USING (key)
				 WHERE a.value IS DISTINCT FROM b.value)
			   END
		FROM jsonb_each($1) i
		LEFT JOIN %1$s t ON portal_sync.value_text(t.%2$I) = i.key
		WHERE t.%2$I IS NULL
		   OR jsonb_populate_record(NULL::%1$s, i.value) IS DISTINCT FROM t$q$,
		s.source, s.key_col) USING items;
END
$fn$;

-- A patient's chart and a small record: n items of every clinical source
-- (medications, allergies, problems, immunizations, vitals, final labs), a
-- preliminary lab (not shareable), a draft note (not shareable) and one
-- insurance row.  No initiating event.
CREATE FUNCTION pstest.make_patient(pid int, n int DEFAULT 1, chart_privacy int DEFAULT 0)
RETURNS void LANGUAGE sql AS $fn$
INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob, sex,
						 guardian_name, privacy_level)
VALUES (pid, 'MRN' || pid, 'First' || pid, 'Last' || pid,
		date '2014-01-01' + pid % 3000, 'F', 'Guardian ' || pid, chart_privacy);
INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dose, route, frequency, start_date)
SELECT pid, 'amoxicillin ' || i, '723', (250 * i) || ' mg', 'oral', 'BID', date '2024-02-01' + i
FROM generate_series(1, n) i;
INSERT INTO ehr.allergy (patient_id, allergen, reaction, severity, onset_date, recorded_at)
SELECT pid, 'peanut ' || i, 'hives', 'moderate', date '2020-03-01', date '2024-02-01' + i
FROM generate_series(1, n) i;
INSERT INTO ehr.problem (patient_id, description, icd10, onset_date, noted_on)
SELECT pid, 'asthma ' || i, 'J45.909', date '2021-05-01', date '2024-02-01' + i
FROM generate_series(1, n) i;
INSERT INTO ehr.immunization (patient_id, vaccine, cvx, dose_number, administered_on, lot_number)
SELECT pid, 'DTaP', '20', i, date '2024-02-01' + i, 'LOT' || i
FROM generate_series(1, n) i;
INSERT INTO ehr.vital_sign (patient_id, measured_at, height_cm, weight_kg, temp_c, pulse)
SELECT pid, timestamp '2024-02-01 10:30:00' + i * interval '1 day', 100.5 + i, 15.125 + i, 36.8, 90 + i
FROM generate_series(1, n) i;
INSERT INTO ehr.lab_result (patient_id, test_name, loinc, value, units, status, result_date)
SELECT pid, 'hemoglobin', '718-7', (12 + i)::text, 'g/dL', 'final', date '2024-02-01' + i
FROM generate_series(1, n) i;
INSERT INTO ehr.lab_result (patient_id, test_name, value, status, result_date)
VALUES (pid, 'lead level', 'pending', 'preliminary', date '2024-03-01');
INSERT INTO ehr.visit_note (patient_id, provider, note_type, visit_date, body)
VALUES (pid, 'Dr. Test', 'encounter', date '2024-03-01', 'draft note');
INSERT INTO ehr.insurance (patient_id, payer, plan_name, member_id, effective_date)
VALUES (pid, 'Acme Health', 'Kids Plan', 'M' || pid, date '2024-01-01');
$fn$;

-- An appointment (initiating event).
CREATE FUNCTION pstest.book(pid int) RETURNS bigint LANGUAGE sql AS $fn$
INSERT INTO ehr.appointment (patient_id, provider, appt_type, starts_at, reason)
VALUES (pid, 'Dr. Test', 'well_child', timestamptz '2026-12-01 15:00:00+00', 'checkup')
RETURNING appt_id;
$fn$;
EOSQL

=pod

=head2 ps_sql_json(node, db, query)

Rows of query as an array of hashes (via json_agg).

=cut

sub ps_sql_json
{
	my ($node, $db, $query) = @_;
	my $out = $node->safe_psql($db,
		"SELECT coalesce(json_agg(x), '[]') FROM ($query) x");
	return $JSON->decode($out);
}

=pod

=head2 ps_query(node, db, sql)

Like safe_psql, but an error does not end the test script: returns
"ERROR: ..." (and diags it) instead, so that a missing or failing function
fails its own assertion only.

=cut

sub ps_query
{
	my ($node, $db, $sql) = @_;
	my ($ret, $out, $err) = $node->psql($db, $sql, on_error_stop => 1);
	return $out if $ret == 0;
	$err =~ s/^psql:<stdin>:\d+: //mg;
	diag("query failed: $sql\n$err");
	return "ERROR $err";
}

sub ps_sql_row
{
	my ($node, $db, $query) = @_;
	my $rows = ps_sql_json($node, $db, $query);
	return $rows->[0];
}

# The one row of portal_sync.status.
sub ps_status
{
	my ($node, $db) = @_;
	return ps_sql_row($node, $db // 'postgres', 'SELECT * FROM portal_sync.status');
}

sub ps_dead_letters
{
	my ($node, $db) = @_;
	return ps_sql_json($node, $db // 'postgres',
		'SELECT * FROM portal_sync.dead_letters ORDER BY seq');
}

sub ps_enrolled
{
	my ($node, $db) = @_;
	my $rows = ps_sql_json($node, $db // 'postgres',
		'SELECT patient_id FROM portal_sync.patients ORDER BY 1');
	return [ map { $_->{patient_id} } @$rows ];
}

# pid of the delivery worker of db (undef if none).
sub ps_worker_pid
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	my $pid = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'portal_sync worker' AND datname = '$db'"
	);
	return $pid eq '' ? undef : $pid;
}

=pod

=head2 ps_kill_worker(node, db, [pid])

kill -9 of the delivery worker of db (or of pid), then wait until the
server has reinitialized and accepts connections again.  Polling for a
connection alone is not enough: one made before the postmaster has noticed
the crash succeeds, and the next query meets "the database system is in
recovery mode".  Returns true once the server is back.

=cut

sub ps_kill_worker
{
	my ($node, $db, $pid) = @_;
	$db //= 'postgres';
	$pid //= ps_worker_pid($node, $db);
	return 0 unless $pid;
	my $log_offset = -s $node->logfile;
	return 0 unless kill('KILL', $pid);
	$node->wait_for_log(qr/all server processes terminated; reinitializing/, $log_offset);
	return ps_wait_until(sub { my ($r) = $node->psql($db, 'SELECT 1'); $r == 0 },
		'server accepts connections', 60);
}

=pod

=head2 ps_wait_drained(node, db, [timeout])

Waits until the outbox of db is empty and status.pending_events and
status.pending_snapshots are 0 (everything accepted or dead-lettered, no
resync waiting).  Returns true on success.

=cut

sub ps_wait_drained
{
	my ($node, $db, $timeout) = @_;
	$db //= 'postgres';
	my $q =
	  q{SELECT (SELECT count(*) FROM portal_sync.outbox) = 0 AND pending_events = 0 AND pending_snapshots = 0 FROM portal_sync.status};
	my $last = '';
	my $ok = ps_wait_until(
		sub {
			my ($ret, $out, $err) = $node->psql($db, $q);
			$last = "$out $err";
			return $ret == 0 && $out eq 't';
		},
		"outbox of $db drained",
		$timeout);
	unless ($ok)
	{
		my ($r, $o, $e) = $node->psql($db,
			q{SELECT row_to_json(s) FROM portal_sync.status s});
		diag("not drained; last poll: $last; status: $o $e");
	}
	return $ok;
}

=pod

=head2 ps_set_conf(node, settings_text)

ALTER SYSTEM the given "name = value" lines (hash ref name => value) and
reload.

=cut

sub ps_set_conf
{
	my ($node, %set) = @_;
	for my $k (sort keys %set)
	{
		my $v = $set{$k};
		# Not in the server log (log_statement = all): secrets stay out.
		if (defined $v)
		{
			$v =~ s/'/''/g;
			$node->safe_psql('postgres',
				"SET log_statement = 'none'; ALTER SYSTEM SET $k = '$v'");
		}
		else
		{
			$node->safe_psql('postgres',
				"SET log_statement = 'none'; ALTER SYSTEM RESET $k");
		}
	}
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	return;
}

=pod

=head2 ps_expected_items(node, db)

{patient_id => {source => {key => 1}}} of what should be on the portal.

=cut

sub ps_expected_items
{
	my ($node, $db) = @_;
	my $rows = ps_sql_json($node, $db // 'postgres',
		'SELECT * FROM pstest.expected_items()');
	my %exp;
	$exp{ $_->{patient_id} }{ $_->{source} }{ $_->{key} } = 1 for @$rows;
	return \%exp;
}

=pod

=head2 ps_portal_items(portal, practice)

{patient_id => {source => {key => data}}} of what the portal holds for the
practice (patients and sources without items left out).

=cut

sub ps_portal_items
{
	my ($portal, $practice, $state) = @_;
	$state //= $portal->state;
	my $pts = $state->{practices}{$practice}{patients} || {};
	my %have;
	for my $pid (keys %$pts)
	{
		my $items = $pts->{$pid}{items} || {};
		for my $src (keys %$items)
		{
			for my $key (keys %{ $items->{$src} })
			{
				$have{$pid}{$src}{$key} = $items->{$src}{$key};
			}
		}
	}
	return \%have;
}

=pod

=head2 ps_compare_state(node, db, portal, name, [practice => id], [exclude => [[patient, source, key], ...]])

Checks that the portal holds exactly the shareable items of the database
(same patients, sources, keys) and that every item's data equals the row in
the database.  exclude lists items expected to be missing (dead-lettered).
Returns true if both checks passed.

=cut

sub ps_compare_state
{
	my ($node, $db, $portal, $name, %opt) = @_;
	$db //= 'postgres';
	my $practice = $opt{practice}
	  // $node->safe_psql($db, 'SELECT practice_id FROM portal_sync.settings');
	my $exp = ps_expected_items($node, $db);
	for my $x (@{ $opt{exclude} || [] })
	{
		my ($p, $s, $k) = @$x;
		delete $exp->{$p}{$s}{$k};
		delete $exp->{$p}{$s} unless %{ $exp->{$p}{$s} || {} };
		delete $exp->{$p} unless %{ $exp->{$p} || {} };
	}
	my $have = ps_portal_items($portal, $practice);
	# Excluded items are ignored on both sides (a dead-lettered change may
	# leave an older version of the row on the portal).
	for my $x (@{ $opt{exclude} || [] })
	{
		my ($p, $s, $k) = @$x;
		delete $have->{$p}{$s}{$k} if $have->{$p} && $have->{$p}{$s};
	}

	my (@missing, @extra);
	for my $p (sort keys %$exp)
	{
		for my $s (sort keys %{ $exp->{$p} })
		{
			for my $k (sort keys %{ $exp->{$p}{$s} })
			{
				push @missing, "$p/$s/$k" unless exists $have->{$p}{$s}{$k};
			}
		}
	}
	for my $p (sort keys %$have)
	{
		for my $s (sort keys %{ $have->{$p} })
		{
			for my $k (sort keys %{ $have->{$p}{$s} })
			{
				push @extra, "$p/$s/$k" unless $exp->{$p}{$s}{$k};
			}
		}
	}
	my $ok = ok(!@missing && !@extra,
		"$name: portal holds exactly the shareable items");
	unless ($ok)
	{
		diag('missing on the portal (patient/source/key): '
			  . join(' ', @missing[ 0 .. ($#missing > 40 ? 40 : $#missing) ])
			  . (@missing > 41 ? ' ...' : ''))
		  if @missing;
		diag('on the portal but not shareable: '
			  . join(' ', @extra[ 0 .. ($#extra > 40 ? 40 : $#extra) ])
			  . (@extra > 41 ? ' ...' : ''))
		  if @extra;
	}

	# Data of every item against the row as it is now.
	my %by_source;
	for my $p (keys %$have)
	{
		for my $s (keys %{ $have->{$p} })
		{
			$by_source{$s}{$_} = $have->{$p}{$s}{$_}
			  for keys %{ $have->{$p}{$s} };
		}
	}
	my @bad;
	for my $s (sort keys %by_source)
	{
		my $j = $JSON->encode($by_source{$s});
		my $tag = '$pj' . int(rand(1e9)) . '$';
		my $rows = ps_sql_json($node, $db,
			"SELECT * FROM pstest.mismatched('$s', ${tag}${j}${tag}::jsonb)");
		push @bad, map { "$s/$_->{key}: $_->{problem}" } @$rows;
	}
	my $ok2 = ok(!@bad, "$name: every item's data equals its row");
	diag('data differs: '
		  . join('; ', @bad[ 0 .. ($#bad > 20 ? 20 : $#bad) ]))
	  unless $ok2;
	return $ok && $ok2;
}

=pod

=head2 ps_check_portal_invariants(portal, name)

No per-patient order violation, no C-CDA before the snapshot, no item event
for a purged patient before its next snapshot, well-formed snapshots and no
protocol error (headers, body shape) in any request.

=cut

sub ps_check_portal_invariants
{
	my ($portal, $name, $state) = @_;
	$state //= $portal->state;
	my $all = 1;
	for my $what (
		qw(order_violations ccda_violations purge_violations
		snapshot_violations protocol_errors))
	{
		my $list = $state->{$what} || [];
		my $ok = ok(!@$list, "$name: no $what");
		diag($JSON->encode([ @$list[ 0 .. ($#$list > 5 ? 5 : $#$list) ] ]))
		  unless $ok;
		$all &&= $ok;
	}
	return $all;
}

=pod

=head2 ps_accepted_events(requests)

The events of the requests answered 2xx (and not rejected), in order, each
with its request number.

=cut

sub ps_accepted_events
{
	my ($reqs) = @_;
	my @out;
	for my $r (@$reqs)
	{
		next unless $r->{status} =~ /^2\d\d$/ && $r->{applied};
		my %rej = map { $_ => 1 } @{ $r->{rejected} || [] };
		for my $ev (@{ $r->{events} })
		{
			next if $rej{ $ev->{event_id} };
			push @out, { %$ev, request => $r->{n} };
		}
	}
	return \@out;
}

=pod

=head2 ps_events(requests, [accepted => 1], [patient => id], [source => s], [key => k], [op => op], [practice => p])

Events of the requests (each with its request number and status), filtered.

=cut

sub ps_events
{
	my ($reqs, %f) = @_;
	my @out;
	for my $r (@$reqs)
	{
		next if $f{accepted} && !($r->{status} =~ /^2\d\d$/ && $r->{applied});
		next if defined $f{practice} && ($r->{practice_id} // '') ne $f{practice};
		my %rej = map { $_ => 1 } @{ $r->{rejected} || [] };
		for my $ev (@{ $r->{events} })
		{
			next if $f{accepted} && $rej{ $ev->{event_id} };
			next if defined $f{patient} && ($ev->{patient_id} // '') ne $f{patient};
			next if defined $f{source}  && ($ev->{source} // '') ne $f{source};
			next if defined $f{key}     && ($ev->{key} // '') ne $f{key};
			next if defined $f{op}      && ($ev->{op} // '') ne $f{op};
			push @out, { %$ev, request => $r->{n}, status => $r->{status} };
		}
	}
	return \@out;
}

=pod

=head2 ps_check_ccda_after_snapshot(requests, name)

Every request carrying a C-CDA upsert of a patient comes after a request,
answered 2xx, that carried the patient's snapshot_end.

=cut

sub ps_check_ccda_after_snapshot
{
	my ($reqs, $name) = @_;
	my %snap_ok;    # patient => first request accepting its snapshot_end
	my @bad;
	for my $r (sort { $a->{n} <=> $b->{n} } @$reqs)
	{
		for my $ev (@{ $r->{events} })
		{
			next unless ($ev->{kind} // '') eq 'ccda' && $ev->{op} eq 'upsert';
			my $key = "$r->{practice_id}/$ev->{patient_id}";
			push @bad, "request $r->{n}: ccda $ev->{key} of patient $ev->{patient_id}"
			  unless defined $snap_ok{$key};
		}
		if ($r->{status} =~ /^2\d\d$/)
		{
			for my $ev (@{ $r->{events} })
			{
				next unless $ev->{op} eq 'snapshot_end';
				$snap_ok{"$r->{practice_id}/$ev->{patient_id}"} //= $r->{n};
			}
		}
	}
	ok(!@bad, "$name: C-CDA documents are sent only after the snapshot is accepted")
	  or diag(join('; ', @bad));
	return !@bad;
}

=pod

=head2 ps_check_send_order(requests, name)

SPEC 5: "a later event of a patient is never sent while an earlier one is
unaccepted".  For every request, each (non-C-CDA) event of a patient may
only be sent when every earlier-seq event of that patient that was ever
resolved (accepted, or dead-lettered: in a rejected list, or alone in a
batch answered with a final 4xx) was resolved by an earlier request or
rides in the same request before it.  Events never resolved (superseded by
a coalesced later event or a snapshot) are not held against it.  A request
that resolved nothing (a retryable failure) is only held to the events
already sent before it: rules are applied when a unit is built, so a
change the worker had nothing to send for (not shareable then, consumed
without an event) may become an event when the unit is built again after
the failure, e.g. after a settings change; the failed request never
reached the portal's state, so it did not overtake that event.

=cut

sub ps_check_send_order
{
	my ($reqs, $name) = @_;
	my @sorted = sort { $a->{n} <=> $b->{n} } @$reqs;
	my %resolved_at;    # event_id => request number
	my %first_sent;     # event_id => request number
	my %resolving;      # request number => resolved its events
	my %info;           # event_id => [practice/patient, seq]
	for my $r (@sorted)
	{
		my $st = $r->{status};
		my %rej = map { $_ => 1 } @{ $r->{rejected} || [] };
		my @evs = @{ $r->{events} || [] };
		$resolving{ $r->{n} } = ($st =~ /^2\d\d$/ && $r->{applied})
		  || ($st =~ /^4\d\d$/ && $st !~ /^(401|403|408|413|425|429)$/ && @evs == 1);
		for my $ev (@evs)
		{
			next if ($ev->{kind} // '') eq 'ccda';
			$info{ $ev->{event_id} } //= [ "$r->{practice_id}/$ev->{patient_id}", $ev->{seq} ];
			$first_sent{ $ev->{event_id} } //= $r->{n};
			my $res;
			if ($st =~ /^2\d\d$/ && $r->{applied})
			{
				$res = 1;
			}
			elsif ($st =~ /^4\d\d$/ && $st !~ /^(401|403|408|413|425|429)$/ && @evs == 1)
			{
				$res = 1;
			}
			# seqs are taken when a batch is built (SPEC 5): an event sent
			# again after a failure may carry another seq; the one that
			# counts is the seq under which it was resolved
			if ($res && !defined $resolved_at{ $ev->{event_id} })
			{
				$resolved_at{ $ev->{event_id} } = $r->{n};
				$info{ $ev->{event_id} } = [ "$r->{practice_id}/$ev->{patient_id}", $ev->{seq} ];
			}
		}
	}
	# patient => [[seq, resolved_at], ...]
	my %by_patient;
	for my $id (keys %resolved_at)
	{
		my ($pp, $seq) = @{ $info{$id} };
		push @{ $by_patient{$pp} }, [ $seq, $resolved_at{$id}, $id ];
	}
	my @bad;
	for my $r (@sorted)
	{
		my %in_req;
		$in_req{ $_->{event_id} } = 1 for @{ $r->{events} || [] };
		for my $ev (@{ $r->{events} || [] })
		{
			next if ($ev->{kind} // '') eq 'ccda';
			my $pp = "$r->{practice_id}/$ev->{patient_id}";
			for my $e (@{ $by_patient{$pp} || [] })
			{
				my ($seq, $at, $id) = @$e;
				next unless $seq < $ev->{seq};
				next if $at < $r->{n} || $in_req{$id};
				next if !$resolving{ $r->{n} } && $first_sent{$id} > $r->{n};
				push @bad, "request $r->{n}: patient $ev->{patient_id} seq $ev->{seq} sent before seq $seq (resolved in request $at)";
				last;
			}
		}
		last if @bad > 10;
	}
	ok(!@bad, "$name: no later event of a patient sent while an earlier one is unaccepted")
	  or diag(join("\n", @bad));
	return !@bad;
}

=pod

=head2 ps_check_event_ids_stable(requests, name)

Event identity follows content (SPEC 5): every time an event_id is sent,
it carries the same content (everything but its seq, which is taken again
when a batch is rebuilt; but an upsert inside a snapshot belongs to that
snapshot, so its seq counts), so a portal that dedupes by event_id never keeps
an older content in place of a newer one; and a batch_id sent twice names
the very same body.

=cut

sub ps_check_event_ids_stable
{
	my ($reqs, $name) = @_;
	my (%contents, %bodies, %snapshot_seqs);
	# An item of a snapshot is mentioned by that snapshot, named by its
	# seq: the same item in another snapshot is another content (a portal
	# that dedupes it would not count it as mentioned, and drop it at the
	# end).  Outside snapshots the seq is not content: a rebuilt unit sends
	# the same change under a new seq.
	for my $r (@$reqs)
	{
		for my $ev (@{ $r->{events} || [] })
		{
			$snapshot_seqs{"$r->{practice_id}|$ev->{patient_id}|$ev->{seq}"} = 1
			  if ($ev->{op} // '') eq 'snapshot_begin' && defined $ev->{seq};
		}
	}
	for my $r (@$reqs)
	{
		my @evs = @{ $r->{events} || [] };
		for my $i (0 .. $#evs)
		{
			my $digest = ($r->{event_digests} || [])->[$i] // '';
			my $ev = $evs[$i];
			$digest .= "|in snapshot $ev->{seq}"
			  if ($ev->{op} // '') eq 'upsert' && defined $ev->{seq}
			  && $snapshot_seqs{"$r->{practice_id}|$ev->{patient_id}|$ev->{seq}"};
			$contents{ $ev->{event_id} // '' }{ "$r->{practice_id}|$digest" } = 1;
		}
		$bodies{ $r->{batch_id} // '' }{ $r->{body_sha} // '' } = 1
		  if defined $r->{batch_id};
	}
	my @bad = grep { keys %{ $contents{$_} } > 1 } sort keys %contents;
	my @bad2 = grep { keys %{ $bodies{$_} } > 1 } sort keys %bodies;
	ok(!@bad, "$name: an event_id always carries the same content")
	  or diag('event_id sent with several contents: '
		  . join('; ', @bad[ 0 .. ($#bad > 10 ? 10 : $#bad) ]));
	ok(!@bad2, "$name: a batch_id always names the same body")
	  or diag('batch_id sent with several bodies: '
		  . join('; ', @bad2[ 0 .. ($#bad2 > 10 ? 10 : $#bad2) ]));
	return !@bad && !@bad2;
}

#########################################################################
# Invariant checks of the fault, load and privacy tests (010..019).

push @EXPORT, qw(ps_check_sent_shareable ps_check_accepted_once
  ps_check_settled ps_nreq ps_resent_after);

# Up to portal_sync.max_inflight requests go out at once, each for other
# patients, so "the next request" is not the next attempt of a batch: the
# next attempt is the next request carrying its events again.
# The first later request that carries an event of request $r again (the
# same content: the same event digest), or undef.
sub ps_resent_after
{
	my ($reqs, $r) = @_;
	my %mine = map { defined $_ ? ($_ => 1) : () } @{ $r->{event_digests} // [] };
	my ($again) = sort { $a->{time} <=> $b->{time} }
	  grep { $_->{n} > $r->{n} && grep { defined $_ && $mine{$_} } @{ $_->{event_digests} // [] } } @$reqs;
	return $again;
}

# Number of requests the portal has seen so far (a mark for since =>).
sub ps_nreq
{
	my ($portal) = @_;
	return scalar @{ $portal->requests };
}

=pod

=head2 ps_check_sent_shareable(node, db, portal, since, name, [practice => id])

"Nothing withheld ever received": every upsert the portal received
(whatever it answered) in the requests from number since on was of an item
shareable in the database as it is now, and carried the row as it is now.

Valid when the database did not change since the first of those requests
was sent: the tests make each change in one transaction, wait until the
outbox is drained, and check, so "now" is the state at send time.  Returns
true if both hold.

=cut

sub ps_check_sent_shareable
{
	my ($node, $db, $portal, $since, $name, %opt) = @_;
	$db //= 'postgres';
	my $practice = $opt{practice}
	  // $node->safe_psql($db, 'SELECT practice_id FROM portal_sync.settings');
	my $reqs = $portal->requests(since => $since, full => 1);
	my $exp = ps_expected_items($node, $db);
	my (@withheld, %batches, $n);
	for my $r (@$reqs)
	{
		next if ($r->{practice_id} // '') ne $practice;
		for my $ev (@{ $r->{events} || [] })
		{
			next unless ($ev->{op} // '') eq 'upsert';
			$n++;
			my ($p, $s, $k) = ($ev->{patient_id}, $ev->{source}, $ev->{key});
			push @withheld, "request $r->{n} ($r->{status}): $p/$s/$k seq $ev->{seq}"
			  unless $exp->{$p}{$s}{$k};
			# Each key once per batch of the mismatch query.
			my $list = $batches{$s} //= [];
			my ($b) = grep { !exists $_->{$k} } @$list;
			push @$list, ($b = {}) unless $b;
			$b->{$k} = $ev->{data};
		}
	}
	my $ok = ok(!@withheld,
		"$name: no upsert of an item not shareable when sent ("
		  . ($n // 0) . ' upserts checked)');
	diag('withheld items received by the portal: '
		  . join('; ', @withheld[ 0 .. ($#withheld > 20 ? 20 : $#withheld) ]))
	  unless $ok;
	my @bad;
	for my $s (sort keys %batches)
	{
		for my $b (@{ $batches{$s} })
		{
			my $j = $JSON->encode($b);
			my $tag = '$pj' . int(rand(1e9)) . '$';
			my $rows = ps_sql_json($node, $db,
				"SELECT * FROM pstest.mismatched('$s', ${tag}${j}${tag}::jsonb)");
			push @bad, map { "$s/$_->{key}: $_->{problem}" } @$rows;
		}
	}
	my $ok2 = ok(!@bad, "$name: every upsert carried the row as it was when sent");
	diag('sent data differs: ' . join('; ', @bad[ 0 .. ($#bad > 20 ? 20 : $#bad) ]))
	  unless $ok2;
	return $ok && $ok2;
}

=pod

=head2 ps_check_accepted_once(portal, name, [resends => 1], [since => n])

The portal holds every accepted event_id once (its dedupe).  Unless
resends (worker crashes, timeouts of requests the portal applied, standby
promotion), no event_id was accepted by two requests either: a batch the
worker heard accepted is never sent again (checked for the requests from
number since on).

=cut

sub ps_check_accepted_once
{
	my ($portal, $name, %opt) = @_;
	my $since = $opt{since} // 0;
	my $state = $opt{state} // $portal->state;
	my (%seen, @twice);
	for my $ev (@{ ps_accepted_events($opt{requests} // $portal->requests) })
	{
		push @twice, "$ev->{event_id} (request $ev->{request})"
		  if $seen{ $ev->{event_id} }++ && $ev->{request} >= $since;
	}
	my $distinct = scalar keys %seen;
	my $ok = is($state->{applied_event_ids}, $distinct,
		"$name: the portal applied each accepted event_id once");
	unless ($opt{resends})
	{
		ok(!@twice, "$name: no event_id accepted twice")
		  or diag(scalar(@twice) . ' event_ids accepted again, e.g. '
			  . join(' ', @twice[ 0 .. ($#twice > 5 ? 5 : $#twice) ]))
		  or $ok = 0;
	}
	else
	{
		note("$name: " . scalar(@twice) . ' event_ids accepted again (resends after crashes or timeouts; deduped)');
	}
	return $ok;
}

=pod

=head2 ps_check_settled(node, db, portal, name, [since => n], [timeout => s], [exclude => [...]], [resends => 1], [dead_letters => n])

The invariant check every fault test ends with: waits until drained, then
the portal's state equals the shareable state (ps_compare_state), its
invariants hold, event ids are stable, order holds, C-CDA waited for the
snapshot, each event_id accepted once, nothing dead-lettered (or the given
number), and, with since, no withheld item was received since that
request (ps_check_sent_shareable).

=cut

sub ps_check_settled
{
	my ($node, $db, $portal, $name, %opt) = @_;
	$db //= 'postgres';
	my $ok = ok(ps_wait_drained($node, $db, $opt{timeout}), "$name: drained");
	my $reqs = $portal->requests;
	my $state = $portal->state;
	$ok &= ps_compare_state($node, $db, $portal, $name,
		$opt{exclude} ? (exclude => $opt{exclude}) : ());
	$ok &= ps_check_portal_invariants($portal, $name, $state);
	$ok &= ps_check_event_ids_stable($reqs, $name);
	$ok &= ps_check_send_order($reqs, $name);
	$ok &= ps_check_ccda_after_snapshot($reqs, $name);
	$ok &= ps_check_accepted_once($portal, $name, resends => $opt{resends}, since => $opt{since},
		requests => $reqs, state => $state);
	$ok &= ps_check_sent_shareable($node, $db, $portal, $opt{since}, $name)
	  if defined $opt{since};
	my $dl = ps_dead_letters($node, $db);
	is(scalar @$dl, $opt{dead_letters} // 0, "$name: dead letters")
	  or diag(explain $dl)
	  or $ok = 0;
	return $ok;
}

=pod

=head2 ps_diag_stuck(node, db)

Diags what may hold delivery back: the outbox, the resync queue, the
patients concerned, open transactions and ungranted locks.

=cut

push @EXPORT, qw(ps_diag_stuck);

sub ps_diag_stuck
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	for my $q (
		q{SELECT seq, patient_id, source_id, op, keys, captured_at FROM portal_sync.outbox ORDER BY seq LIMIT 20},
		q{SELECT * FROM portal_sync.resync_queue LIMIT 20},
		q{SELECT * FROM portal_sync.enrollment WHERE patient_id IN (SELECT patient_id FROM portal_sync.outbox UNION SELECT patient_id FROM portal_sync.resync_queue)},
		q{SELECT pid, backend_type, state, xact_start, backend_xid, backend_xmin, wait_event_type, wait_event, left(query, 80) AS query FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND (backend_type = 'portal_sync worker' OR xact_start IS NOT NULL)},
		q{SELECT locktype, relation::regclass, mode, pid FROM pg_locks WHERE NOT granted},
		q{SELECT * FROM portal_sync.status})
	{
		my ($r, $o, $e) = $node->psql($db, "SELECT coalesce(json_agg(x), '[]') FROM ($q) x");
		diag("$q\n  => $o$e");
	}
	return;
}

#########################################################################

package PortalSyncTest::Portal;

use strict;
use warnings;

use Carp;
use HTTP::Tiny;
use IPC::Run;
use JSON::PP;
use Time::HiRes qw(usleep time);
use PostgreSQL::Test::Utils;

my @running;
my $counter = 0;

=pod

=head2 PortalSyncTest::Portal->start([tls_cert => file, tls_key => file], [host => addr], [port => n])

Starts test/portal/portal.py on a free loopback port and waits until it
listens.  Its request log (no row data) goes to tmp_check/log.

=cut

sub start
{
	my ($class, %opt) = @_;
	my $root = PortalSyncTest::ps_root();
	$counter++;
	my $logdir = $PostgreSQL::Test::Utils::log_path
	  // $PostgreSQL::Test::Utils::tmp_check;
	my $base = "$logdir/portal_${counter}_$$";
	my @cmd = ('python3', "$root/test/portal/portal.py", '--port',
		$opt{port} // 0, '--host', $opt{host} // '127.0.0.1', '--log', "$base.requests");
	push @cmd, '--tls-cert', $opt{tls_cert}, '--tls-key', $opt{tls_key}
	  if $opt{tls_cert};
	unlink("$base.out");
	my $h = IPC::Run::start(\@cmd, '<', \undef, '>', "$base.out", '2>',
		"$base.err");
	my $self = bless { h => $h, base => $base, opt => \%opt,
		http => HTTP::Tiny->new(timeout => 60, keep_alive => 0,
			verify_SSL => 0) }, $class;
	my $deadline = time() + 30;
	while (1)
	{
		my $out = -e "$base.out" ? slurp_file("$base.out") : '';
		if ($out =~ /listening on (\d+)/)
		{
			$self->{port} = $1;
			last;
		}
		croak "portal did not start: " . (-e "$base.err" ? slurp_file("$base.err") : '')
		  if time() > $deadline || !$h->pumpable;
		usleep(50_000);
	}
	push @running, $self;
	return $self;
}

sub port { return $_[0]->{port} }

sub url
{
	my ($self) = @_;
	my $scheme = $self->{opt}{tls_cert} ? 'https' : 'http';
	my $host = $self->{opt}{host} // '127.0.0.1';
	$host = '127.0.0.1' if $host eq '0.0.0.0';    # listening everywhere
	return "$scheme://$host:$self->{port}";
}

sub _ctl
{
	my ($self, $method, $path, $body) = @_;
	my $url = $self->url . $path;
	my %o;
	if (defined $body)
	{
		$o{content} = JSON::PP->new->canonical(1)->encode($body);
		$o{headers} = { 'Content-Type' => 'application/json' };
	}
	my $res;
	for my $try (1 .. 50)
	{
		$res = $self->_request($method, $url, \%o);
		last unless $res->{status} == 599;    # not listening (yet)
		usleep(100_000);
	}
	croak "portal control $method $path: $res->{status} $res->{content}"
	  unless $res->{success};
	# Exact numbers for the state (row data); plain ones elsewhere (times).
	return $path =~ m{^/_control/state}
	  ? $PortalSyncTest::JSON->decode($res->{content})
	  : JSON::PP->new->decode($res->{content});
}

# HTTP::Tiny for plain HTTP; curl for HTTPS (no IO::Socket::SSL needed).
sub _request
{
	my ($self, $method, $url, $o) = @_;
	return $self->{http}->request($method, $url, $o)
	  unless $url =~ /^https:/;
	my @cmd = ('curl', '-sk', '-X', $method, '-o', '-', '-w', '\n%{http_code}');
	push @cmd, '-H', 'Content-Type: application/json', '--data-binary', '@-'
	  if defined $o->{content};
	push @cmd, $url;
	my $in = $o->{content} // '';
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \$in, '>', \$out, '2>', \$err);
	my ($content, $code) = $out =~ /^(.*)\n(\d+)$/s;
	$code = 599 if !defined $code || $code == 0;
	return { status => $code, content => $content // $err,
		success => ($code >= 200 && $code < 300) };
}

sub state    { return $_[0]->_ctl('GET', '/_control/state') }
sub reset    { return $_[0]->_ctl('POST', '/_control/reset', {}) }

=pod

=head2 $portal->mode(rule) / $portal->modes(rule, rule, ...)

Sets the answer rules (see portal.py).

=cut

sub mode
{
	my ($self, $rule) = @_;
	return $self->_ctl('POST', '/_control/mode', $rule);
}

sub modes
{
	my ($self, @rules) = @_;
	return $self->_ctl('POST', '/_control/mode', { modes => \@rules });
}

=pod

=head2 $portal->open_gate($name)

Lets the requests held by the gate rule named $name go on (see portal.py).

=cut

sub open_gate
{
	my ($self, $name) = @_;
	return $self->_ctl('POST', '/_control/open', { name => $name });
}

sub requests
{
	my ($self, %o) = @_;
	my $q = '?since=' . ($o{since} // 0);
	$q .= '&full=1' if $o{full};
	return $self->_ctl('GET', "/_control/requests$q");
}

=pod

=head2 $portal->summary

The portal's state without its practices: applied_event_ids, duplicates,
requests and answers as state() has them, and each list of violations or
protocol errors replaced by its length.  For portals holding hundreds of
thousands of items, whose whole state JSON::PP would take minutes to
decode: python3 decodes it and sends back only this.

=cut

sub summary
{
	my ($self) = @_;
	my $py = <<'EOPY';
import json, ssl, sys, urllib.request
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with urllib.request.urlopen(sys.argv[1] + '/_control/state', timeout=600, context=ctx) as r:
    s = json.load(r)
print(json.dumps({k: (len(v) if isinstance(v, list) else v)
                  for k, v in s.items() if k != 'practices'}))
EOPY
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'python3', '-c', $py, $self->url ], '<', \undef, '>', \$out, '2>', \$err)
	  or croak "portal summary failed: $err";
	return JSON::PP->new->decode($out);
}

# Stop listening (connections refused) until up().
sub down
{
	my ($self) = @_;
	$self->{h}->signal('USR1');
	# Wait until connections are refused (a sanitized server's load slows
	# the portal too: 30 s).
	my $deadline = time() + 30;
	while (time() < $deadline)
	{
		my $res = $self->_request('GET', $self->url . '/_control/health', {});
		return if $res->{status} == 599;
		usleep(50_000);
	}
	croak 'portal did not go down';
}

sub up
{
	my ($self) = @_;
	$self->{h}->signal('USR2');
	my $deadline = time() + 30;
	while (time() < $deadline)
	{
		my $res = $self->_request('GET', $self->url . '/_control/health', {});
		return if $res->{success};
		usleep(50_000);
	}
	croak 'portal did not come back up';
}

sub stop
{
	my ($self) = @_;
	return unless $self->{h};
	$self->{h}->signal('TERM');
	eval { $self->{h}->finish; };
	delete $self->{h};
	@running = grep { $_ != $self } @running;
	return;
}

END
{
	for my $p (@running)
	{
		eval {
			$p->{h}->kill_kill(grace => 2) if $p->{h};
		};
	}
}

1;
