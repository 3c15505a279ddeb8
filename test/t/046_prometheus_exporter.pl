
# Copyright (c) 2026, portal_sync developers
#
# portal_sync.metrics through the real postgres_exporter (Debian's
# prometheus-postgres-exporter) with the shipped queries file
# docs/monitoring/postgres_exporter-queries.yaml, connected as a role that
# has pg_monitor and nothing else.  /metrics is scraped over HTTP and each
# portal_sync metric is checked against portal_sync.status: while a backlog
# drains with the EHR writing, during a portal outage (503) and while the
# portal refuses the token (401), with dead letters and rule errors, and
# across a restart of the worker.  The role cannot read the outbox, the
# EHR's tables or the other views.  Then the setups docs/monitoring.md
# gives for several practice databases: auto-discovery (and what a
# database without the extension does to it), and one DSN per database
# with a role that has the three grants and no pg_monitor.
#
# Skipped only when the exporter binary is absent (PS_POSTGRES_EXPORTER
# names another one).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use HTTP::Tiny;
use IPC::Run;
use Time::HiRes qw(time sleep);

my $exporter_bin = $ENV{PS_POSTGRES_EXPORTER} // '/usr/bin/prometheus-postgres-exporter';
plan skip_all => "$exporter_bin is not installed (Debian package prometheus-postgres-exporter)"
  unless -x $exporter_bin;

my $root = PortalSyncTest::ps_root();
my $queries = "$root/docs/monitoring/postgres_exporter-queries.yaml";
my $portal = PortalSyncTest::Portal->start;
my $token = "exporter-test-token-$$";
my $node = ps_new_node('exporter', $portal, conf => qq{
portal_sync.batch_size = 20
portal_sync.auth_token = '$token'
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

# ---------------------------------------------------------------- the role
one(q{CREATE ROLE ps_exporter LOGIN; GRANT pg_monitor TO ps_exporter;});

# psql as the exporter's role: (exit code, stdout, stderr)
sub as_exporter
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql($db, $sql, extra_params => [ '-U', 'ps_exporter' ]);
	return ($ret, $out, $err);
}

my ($ret, $out, $err) = as_exporter('SELECT count(*) FROM portal_sync.metrics');
is("$ret $out", '0 1', 'pg_monitor reads portal_sync.metrics') or diag($err);
for my $forbidden ('portal_sync.outbox', 'portal_sync.status', 'portal_sync.dead_letters',
	'portal_sync.patients', 'portal_sync.delivery_log', 'portal_sync.enrollment',
	'ehr.patient', 'ehr.medication', 'portal_sync.worker_status()')
{
	($ret, $out, $err) = as_exporter("SELECT * FROM $forbidden LIMIT 1");
	isnt($ret, 0, "the exporter's role cannot read $forbidden");
	like($err, qr/permission denied/, "... permission denied ($forbidden)");
}
($ret, $out, $err) = as_exporter('SHOW portal_sync.auth_token');
unlike($out, qr/\Q$token\E/, 'the exporter\'s role does not see the token');

# ---------------------------------------------------------------- the exporter
my $logdir = $PostgreSQL::Test::Utils::log_path // $PostgreSQL::Test::Utils::tmp_check;
my $http = HTTP::Tiny->new(timeout => 20, keep_alive => 0);
my $last_text = '';
my @exporters;

# Start postgres_exporter with the queries file, connected as $user to the
# databases @$dbs (one DSN each), with more arguments @$args: its port.
sub start_exporter
{
	my ($name, $user, $dbs, @args) = @_;
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	local $ENV{DATA_SOURCE_NAME} = join(',',
		map { 'host=' . $node->host . ' port=' . $node->port . " user=$user dbname=$_ sslmode=disable" } @$dbs);
	push @exporters, IPC::Run::start(
		[ $exporter_bin, "--web.listen-address=127.0.0.1:$port",
		  "--extend.query-path=$queries", @args ],
		'<', \undef, '>', "$logdir/exporter_${name}_$$.out", '2>', "$logdir/exporter_${name}_$$.err");
	return $port;
}
my $port = start_exporter('main', 'ps_exporter', [$db]);
my $logbase = "$logdir/exporter_main_$$";

# One scrape of /metrics (of the main exporter, or of the one on $on_port):
# the portal_sync series of $db (or $of_db) by name (the worker's state as
# {state}{name}), the exporter's own health and the declared types; undef
# if the scrape failed.  {datnames} lists every datname seen, {status} is
# the HTTP status.
sub scrape
{
	my ($on_port, $of_db) = @_;
	$on_port //= $port;
	$of_db //= $db;
	my $r = $http->get("http://127.0.0.1:$on_port/metrics");
	return undef unless $r->{success};
	$last_text = $r->{content};
	my %m = (state => {}, type => {}, datnames => {});
	for my $line (split /\n/, $r->{content})
	{
		if ($line =~ /^# TYPE (portal_sync_\w+) (\w+)$/)
		{
			$m{type}{$1} = $2;
		}
		elsif ($line =~ /^(portal_sync_\w+)\{([^}]*)\} (\S+)$/)
		{
			my ($name, $labels, $v) = ($1, $2, $3);
			my %l = $labels =~ /(\w+)="([^"]*)"/g;
			$m{datnames}{ $l{datname} // '' } = 1;
			next unless ($l{datname} // '') eq $of_db;
			if ($name eq 'portal_sync_worker_status')
			{
				$m{state}{ $l{state} } = $v;
			}
			else
			{
				$m{ $name =~ s/^portal_sync_//r } = $v;
			}
		}
		elsif ($line =~ /^(pg_up|pg_exporter_last_scrape_error) (\S+)$/)
		{
			$m{$1} = $2;
		}
		elsif ($line =~ /^(pg_\w+)/)
		{
			$m{other_pg}{$1} = 1;
		}
	}
	my @current = grep { $m{state}{$_} == 1 } keys %{ $m{state} };
	$m{worker_state} = @current == 1 ? $current[0] : 'series: ' . join(',', sort @current);
	return \%m;
}

ok(ps_wait_until(sub { my $m = scrape(); $m && defined $m->{pending_events} }, 'the exporter serves portal_sync metrics', 60),
	'the exporter is up and serves portal_sync metrics')
  or BAIL_OUT('no exporter: ' . slurp_file("$logbase.err"));

my $m = scrape();
my %types = (
	pending_events => 'gauge', pending_events_exact => 'gauge',
	oldest_pending_age_seconds => 'gauge', pending_snapshots => 'gauge',
	delivered_total => 'counter', dead_letters => 'gauge',
	rule_errors_total => 'counter', consecutive_failures => 'gauge',
	last_success_age_seconds => 'gauge', auth_failure => 'gauge',
	worker_status => 'gauge');
is_deeply({ map { $_ => $m->{type}{"portal_sync_$_"} } keys %types }, \%types,
	'every portal_sync metric is there, with its type');
is($m->{pg_exporter_last_scrape_error}, 0, 'the exporter\'s queries succeed as the pg_monitor role');
is(scalar(keys %{ $m->{state} }), 9, 'worker state: one series per state');
is(scalar(grep { $_ == 1 } values %{ $m->{state} }), 1, 'worker state: exactly one series is 1');

# A scrape that portal_sync.status brackets without a change (retried until
# one does; the worker moves on its own): (metrics, status).
sub quiet_scrape
{
	my ($what, $on_port, $of_db) = @_;
	$of_db //= $db;
	my ($metrics, $status);
	my $ok = ps_wait_until(
		sub {
			my $before = ps_status($node, $of_db);
			$metrics = scrape($on_port, $of_db);
			$status = ps_status($node, $of_db);
			return 0 unless $metrics;
			for my $k (qw(state pending_events pending_snapshots delivered_total dead_letters
				rule_errors consecutive_failures))
			{
				return 0 unless ($before->{$k} // 'NULL') eq ($status->{$k} // 'NULL');
			}
			return 1;
		},
		"a stable status around a scrape ($what)", 30);
	return ($metrics, $status);
}

# The metrics equal portal_sync.status at a moment it does not change
# (of the main exporter and $db, or of the exporter on $on_port and $of_db).
sub check_against_status
{
	my ($what, $on_port, $of_db) = @_;
	$of_db //= $db;
	my ($mt, $st) = quiet_scrape($what, $on_port, $of_db);
	is($mt->{worker_state}, $st->{state}, "$what: worker state is status.state ($st->{state})");
	is($mt->{pending_events}, $st->{pending_events}, "$what: pending_events") if $mt->{pending_events_exact};
	is($mt->{pending_snapshots}, $st->{pending_snapshots}, "$what: pending_snapshots");
	is($mt->{delivered_total}, $st->{delivered_total}, "$what: delivered_total");
	is($mt->{dead_letters}, $st->{dead_letters}, "$what: dead_letters");
	is($mt->{rule_errors_total}, $st->{rule_errors}, "$what: rule_errors_total");
	is($mt->{consecutive_failures}, $st->{consecutive_failures}, "$what: consecutive_failures");
	my $age = $node->safe_psql($of_db, q{SELECT COALESCE(EXTRACT(epoch FROM oldest_pending_age), 0) FROM portal_sync.status});
	ok(abs($mt->{oldest_pending_age_seconds} - $age) < 5,
		"$what: oldest_pending_age_seconds $mt->{oldest_pending_age_seconds} ~ status $age");
	my $since = $node->safe_psql($of_db, q{SELECT COALESCE(EXTRACT(epoch FROM now() - last_success_at)::text, 'NaN') FROM portal_sync.status});
	ok(($since eq 'NaN' && $mt->{last_success_age_seconds} eq 'NaN')
		  || ($since ne 'NaN' && abs($mt->{last_success_age_seconds} - $since) < 5),
		"$what: last_success_age_seconds $mt->{last_success_age_seconds} ~ status $since");
	return ($mt, $st);
}

# The EHR's writes of one round $i: changes for enrolled patients, insurance
# for anybody, now and then a new enrollment.
sub write_round
{
	my ($i) = @_;
	one(qq{BEGIN;
		UPDATE ehr.medication SET dose = 'round $i' WHERE patient_id = 1 + $i % 20;
		INSERT INTO ehr.vital_sign (patient_id, measured_at, pulse)
			VALUES (1 + $i % 20, timestamp '2025-01-01 12:00' + interval '1 minute' * $i, 60 + $i % 40);
		INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (1 + $i % 30, 'Payer', 'M$i');
		COMMIT;});
	one(qq{SELECT pstest.make_patient(100 + $i); SELECT pstest.book(100 + $i)}) if $i % 7 == 0;
	return;
}

# ---------------------------------------------------------------- healthy
one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 30) i;
	  SELECT pstest.book(i) FROM generate_series(1, 20) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
my ($mt, $st) = check_against_status('healthy, idle');
append_to_file("$logbase.metrics-healthy", $last_text);
is($mt->{worker_state}, 'idle', 'healthy: state idle');
is($mt->{pending_events}, 0, 'healthy: nothing pending');
is($mt->{pending_events_exact}, 1, 'healthy: the pending count is exact');
is($mt->{auth_failure}, 0, 'healthy: no auth failure');
cmp_ok($mt->{delivered_total}, '>', 0, "healthy: delivered_total counts the initial delivery ($mt->{delivered_total})");
cmp_ok($mt->{last_success_age_seconds}, '<', 60, 'healthy: a recent success');
my $delivered_before = $mt->{delivered_total};

# ---------------------------------------------------------------- outage (503)
$portal->mode({ mode => 'status', status => 503 });
my (@pending, @failures, %states_seen, %delivered_seen, $auth_seen);
my $t0 = time();
my $i = 0;
while (time() - $t0 < 12)
{
	write_round(++$i);
	my $s = scrape() or next;
	push @pending, $s->{pending_events};
	push @failures, $s->{consecutive_failures};
	$states_seen{ $s->{worker_state} }++;
	$delivered_seen{ $s->{delivered_total} }++;
	$auth_seen++ if $s->{auth_failure} != 0;
	sleep(0.5);
}
note('outage: states seen ' . join(', ', map { "$_ x$states_seen{$_}" } sort keys %states_seen)
	  . '; pending ' . join(' ', @pending) . '; failures ' . join(' ', @failures));
cmp_ok($pending[-1], '>', $pending[0], "outage: pending_events grows ($pending[0] -> $pending[-1])");
ok($states_seen{backing_off}, 'outage: state backing_off is reported');
is($auth_seen // 0, 0, 'outage: a 503 is no auth failure');
cmp_ok($failures[-1], '>=', 3, "outage: consecutive_failures rises ($failures[-1])");
is_deeply([ grep { $failures[$_] < $failures[ $_ - 1 ] } 1 .. $#failures ], [],
	'outage: consecutive_failures never goes down while the portal fails');
is_deeply([ keys %delivered_seen ], [$delivered_before], 'outage: delivered_total stays put, nothing is accepted');
($mt, $st) = check_against_status('outage');
append_to_file("$logbase.metrics-outage", $last_text);	# for the docs' sample
is($mt->{worker_state}, 'backing_off', 'outage: backing_off');
cmp_ok($mt->{oldest_pending_age_seconds}, '>=', 5, "outage: the oldest pending event ages ($mt->{oldest_pending_age_seconds}s)");

# More than 1000 outbox rows: the count becomes an estimate, near the truth.
one(q{DO $$ BEGIN
		FOR i IN 1..1200 LOOP
			INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (1 + i % 30, 'Bulk', 'B' || i);
		END LOOP;
	  END $$});
($mt, $st) = quiet_scrape('a large backlog');
is($mt->{pending_events_exact}, 0, 'large backlog: pending_events is marked an estimate');
my $rows = one('SELECT count(*) FROM portal_sync.outbox');
cmp_ok($rows, '>', 1000, "large backlog: $rows outbox rows");
ok(abs($mt->{pending_events} - $st->{pending_events}) <= 0.1 * $st->{pending_events},
	"large backlog: estimate $mt->{pending_events} within 10% of status $st->{pending_events}");

# ---------------------------------------------------------------- 401
$portal->mode({ mode => 'status', status => 401 });
ok(ps_wait_until(sub { my $s = scrape(); $s && $s->{auth_failure} == 1 }, 'auth_failure 1', 30),
	'401: auth_failure becomes 1');
($mt, $st) = check_against_status('401');
is($mt->{auth_failure}, 1, '401: auth_failure stays 1');
is($mt->{worker_state}, 'backing_off', '401: backing_off');
like($st->{last_error} // '', qr/401|auth/i, '401: status.last_error says authentication too');
my $failures_401 = $mt->{consecutive_failures};

# ---------------------------------------------------------------- recovery
$portal->mode({ mode => 'ok' });
my @delivered;
$t0 = time();
while (time() - $t0 < 8)
{
	write_round(++$i);
	my $s = scrape() or next;
	push @delivered, $s->{delivered_total};
	sleep(0.3);
}
ok(ps_wait_until(sub { my $s = scrape(); $s && $s->{pending_events} == 0 && $s->{pending_snapshots} == 0 },
	'pending 0', 120), 'recovery: pending_events drains to 0');
push @delivered, scrape()->{delivered_total};
note('recovery: delivered_total ' . join(' ', @delivered));
is_deeply([ grep { $delivered[$_] < $delivered[ $_ - 1 ] } 1 .. $#delivered ], [],
	'recovery: delivered_total never goes backwards');
cmp_ok($delivered[-1], '>', $delivered_before, 'recovery: delivered_total counts the backlog');
ps_check_settled($node, $db, $portal, 'after the outage');
($mt, $st) = check_against_status('recovered');
is($mt->{worker_state}, 'idle', 'recovered: idle');
is($mt->{consecutive_failures}, 0, "recovered: consecutive_failures back to 0 (was $failures_401)");
is($mt->{auth_failure}, 0, 'recovered: auth_failure back to 0');
cmp_ok($mt->{last_success_age_seconds}, '<', 30, 'recovered: a recent success');
is($mt->{oldest_pending_age_seconds}, 0, 'recovered: no pending age');

# ---------------------------------------------------------------- dead letters, rule errors
$portal->mode({ mode => 'reject_event', match => { source => 'insurance', key => '900001' } });
one(q{INSERT INTO ehr.insurance (ins_id, patient_id, payer, member_id) VALUES (900001, 3, 'Rejected', 'R1')});
one(q{SELECT portal_sync.attach('ehr.lab_result', 'clinical', 'patient_id',
		date_col => 'result_date', share_when => 'value::numeric >= 0')});
one(q{INSERT INTO ehr.lab_result (patient_id, test_name, status, result_date, value)
	  VALUES (4, 'Strep A rapid', 'final', '2026-01-10', 'pending')});
ok(ps_wait_drained($node, $db), 'a rejected event and a failing rule: drained');
$portal->mode({ mode => 'ok' });
($mt, $st) = check_against_status('dead letter and rule error');
is($mt->{dead_letters}, 1, 'one dead letter');
cmp_ok($mt->{rule_errors_total}, '>', 0, "rule errors counted ($mt->{rule_errors_total})");

# ---------------------------------------------------------------- worker restart
my $pid = ps_worker_pid($node, $db);
my $total = scrape()->{delivered_total};
one("SELECT pg_terminate_backend($pid)");
ok(ps_wait_until(sub { my $p = ps_worker_pid($node, $db); $p && $p != $pid }, 'a new worker', 60),
	'the worker is started again');
ok(ps_wait_until(sub { my $s = scrape(); $s && $s->{worker_state} eq 'idle' }, 'new worker idle', 60),
	'restarted: idle');
is(scrape()->{delivered_total}, $total,
	'restarted: delivered_total is seeded again from delivery_log, no reset');
write_round(++$i);
ok(ps_wait_until(sub { my $s = scrape(); $s && $s->{delivered_total} > $total }, 'delivered_total grows', 60),
	'restarted: delivered_total goes on counting');
check_against_status('after a worker restart');

# ---------------------------------------------------------------- every practice database
# docs/monitoring.md: one exporter for every practice database, by
# auto-discovery (excluding the databases without the extension) or by one
# DSN per database (then with the default metrics off).
$node->safe_psql('postgres', 'CREATE DATABASE practice2');
$node->safe_psql('postgres', 'CREATE DATABASE no_portal_sync');
ps_setup_db($node, 'practice2');
$node->safe_psql('practice2', q{UPDATE portal_sync.settings SET enabled = false;
	SELECT pstest.make_patient(i, 1) FROM generate_series(1, 5) i;
	SELECT pstest.book(i) FROM generate_series(1, 3) i;});
ok(ps_wait_until(sub { ps_status($node, 'practice2')->{state} eq 'disabled' }, 'practice2 disabled', 60),
	'practice2: delivery disabled, events queue');

my $all = start_exporter('discover_all', 'ps_exporter', [$db], '--auto-discover-databases');
ok(ps_wait_until(sub { my $s = scrape($all); $s && $s->{datnames}{practice2} }, 'auto-discovered practice2', 60),
	'auto-discovery: the other practice database is reported');
is(scrape($all)->{pg_exporter_last_scrape_error}, 1,
	'auto-discovery: a database without the extension makes the queries fail there');

my $discover = start_exporter('discover', 'ps_exporter', [$db], '--auto-discover-databases',
	'--exclude-databases=no_portal_sync');
ok(ps_wait_until(sub { my $s = scrape($discover); $s && $s->{datnames}{practice2} }, 'auto-discovered practice2', 60),
	'auto-discovery with --exclude-databases: practice2 is reported');
my $s = scrape($discover);
is_deeply([ sort keys %{ $s->{datnames} } ], [ sort($db, 'practice2') ], 'auto-discovery: one datname per practice database');
is($s->{pg_exporter_last_scrape_error}, 0, 'auto-discovery with --exclude-databases: no query fails');
for my $d ($db, 'practice2')
{
	check_against_status("auto-discovery, $d", $discover, $d);
}
is(scrape($discover, 'practice2')->{worker_state}, 'disabled', 'auto-discovery: practice2 is disabled');
cmp_ok(scrape($discover, 'practice2')->{pending_events}, '>', 0, 'auto-discovery: practice2 has its own backlog');

# The narrowest role: the three grants, in each database, and no pg_monitor.
$node->safe_psql('postgres', 'CREATE ROLE ps_metrics_only LOGIN');
for my $d ($db, 'practice2')
{
	$node->safe_psql($d, q{GRANT USAGE ON SCHEMA portal_sync TO ps_metrics_only;
		GRANT SELECT ON portal_sync.metrics TO ps_metrics_only;
		GRANT EXECUTE ON FUNCTION portal_sync.worker_metrics() TO ps_metrics_only;});
}
my $dsns = start_exporter('dsns', 'ps_metrics_only', [ $db, 'practice2' ],
	'--disable-default-metrics', '--disable-settings-metrics', '--no-collector.database',
	'--no-collector.bgwriter');
ok(ps_wait_until(sub { my $s = scrape($dsns); $s && $s->{datnames}{practice2} && $s->{datnames}{$db} }, 'both DSNs', 60),
	'one DSN per database: both practice databases are reported');
$s = scrape($dsns);
is($s->{pg_exporter_last_scrape_error}, 0, 'one DSN per database, role with the three grants only: no query fails');
is_deeply([ grep { !/^pg_exporter_|^pg_up$/ } sort keys %{ $s->{other_pg} || {} } ], [],
	'one DSN per database: only portal_sync metrics, no server-wide ones reported twice');
for my $d ($db, 'practice2')
{
	check_against_status("one DSN per database, $d", $dsns, $d);
}
my ($r2) = $node->psql($db, 'SELECT count(*) FROM portal_sync.outbox', extra_params => [ '-U', 'ps_metrics_only' ]);
isnt($r2, 0, 'the narrowest role cannot read the outbox');

$_->kill_kill for @exporters;
$node->stop;
$portal->stop;
done_testing();
