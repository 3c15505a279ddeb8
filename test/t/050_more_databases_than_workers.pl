
# Copyright (c) 2026, portal_sync developers
#
# More databases than workers (SPEC 2): 20 databases with the extension and
# portal_sync.max_workers = 4, events written in every one while delivery
# runs: workers take turns, every database's events reach the portal
# exactly, no database waits more than a few seconds for a turn (measured
# enrollment commit -> snapshot accepted per database, a generous bound
# asserted, the maxima printed), and a database waiting for its turn says
# waiting_for_worker in status (made certain: the portal holds the
# requests of four workers at a gate while a fifth database is written).  Then 12 databases with max_workers = 8
# and max_worker_processes = 8, where the postmaster runs out of
# background worker slots first: all served, also after a restart.  A
# database without the extension never gets a worker (the launcher does
# not probe it: no worker is ever registered for it, by the postmaster's
# own log).  After a standby's promotion, a database created after its
# base backup is found and served.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use List::Util;

my $portal = PortalSyncTest::Portal->start;

# The patient of the gated phase: its wait is the time the test held the
# portal's gate, not a turn's wait under load.
my $GATE_PATIENT = 900;

# Largest (snapshot accepted - enrolled) of the patients of db, in seconds
# (the gated phase's patient left out).
sub max_turn_wait
{
	my ($node, $db) = @_;
	return $node->safe_psql($db,
		qq{SELECT COALESCE(max(EXTRACT(epoch FROM snapshot_accepted_at - enrolled_at)), -1)
		  FROM portal_sync.patients WHERE patient_id <> '$GATE_PATIENT'});
}

# Databases (practice_id = database name) with a request the portal holds
# now (not answered yet), among its requests from number since on.
sub held_practices
{
	my ($portal, $since) = @_;
	my %p = map { ($_->{practice_id} // '?') => 1 }
	  grep { !defined $_->{status} } @{ $portal->requests(since => $since) };
	return sort keys %p;
}

# Workers running now: in all, and in db.
sub workers
{
	my ($node, $db) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*), count(*) FILTER (WHERE datname = '$db') FROM pg_stat_activity"
		  . " WHERE backend_type = 'portal_sync worker'");
}

# Waits until every database of the list has drained, in one overall
# limit, counting the times a database not drained yet said in status
# that it waits for a worker (and keeping the last such error).
my ($seen_waiting, $waiting_error) = (0, '');
sub all_drained
{
	my ($node, $dbs, $limit) = @_;
	my $deadline = time() + $limit;
	my @left = @$dbs;
	while (@left && time() < $deadline)
	{
		@left = grep {
			my ($busy, $state, $error) = split /\|/,
			  $node->safe_psql($_,
				q{SELECT NOT ((SELECT count(*) FROM portal_sync.outbox) = 0 AND pending_events = 0
				   AND pending_snapshots = 0), state, last_error FROM portal_sync.status});
			if ($state eq 'waiting_for_worker')
			{
				$seen_waiting++;
				$waiting_error = $error // '';
			}
			$busy eq 't';
		} @left;
		usleep(100_000) if @left;
	}
	diag('not drained: ' . join(', ', @left)) if @left;
	return !@left;
}

# The registry file exists once the launcher has looked at the databases
# of a first start: a database created after it is known to have no
# extension.
sub registry_written
{
	my ($node) = @_;
	return ps_wait_until(sub { -e $node->data_dir . '/portal_sync.databases' },
		'registry file written', 30);
}

# ------------------------------------------------- 20 databases, 4 workers
my $node = ps_new_node('turns', $portal, no_setup => 1,
	conf => "portal_sync.max_workers = 4\nmax_worker_processes = 16\nrestart_after_crash = on\n");
ok(registry_written($node), 'the launcher wrote its registry of databases');
$node->safe_psql('postgres', 'CREATE DATABASE no_ext');
my @dbs = map { sprintf('practice_%02d', $_) } 1 .. 20;
for my $db (@dbs)
{
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	ps_setup_db($node, $db);
}

# a slow portal (0.3 s a request): every database stays busy for a while,
# so that many have pending events at once
$portal->mode({ mode => 'delay', seconds => 0.3 });
my $rounds = 4;
my ($most_workers, $no_ext_workers) = (0, 0);
my $sample = sub {
	my ($all, $here) = split /\|/, workers($node, 'no_ext');
	$most_workers = $all if $all > $most_workers;
	$no_ext_workers += $here;
};

# A database waits for its turn, for certain: the portal holds every
# request at a gate; four databases are written, and once four requests
# (one per database, so all four workers) are in flight, no worker can
# end its turn: a fifth database written then must say waiting_for_worker.
# The whole-request timeout is raised for the phase (2 s in ps_new_node),
# so that no held request times out and is sent again.
{
	my @gated = @dbs[ 0 .. 3 ];
	my $fifth = $dbs[4];
	ps_set_conf($node, 'portal_sync.http_timeout' => '90s');
	ok(ps_wait_until(sub { $node->safe_psql('postgres', 'SHOW portal_sync.http_timeout') eq '90s' },
			'http_timeout reloaded', 30),
		'gated phase: http_timeout raised to 90s');
	usleep(500_000);    # the running workers take the reload too
	my $mark = ps_nreq($portal);
	$portal->modes({ mode => 'gate', name => 'hold', seconds => 60 }, { mode => 'ok' });
	for my $db (@gated)
	{
		$node->safe_psql($db,
			"SELECT pstest.make_patient($GATE_PATIENT); SELECT pstest.book($GATE_PATIENT);");
	}
	my @held;
	ok(ps_wait_until(sub { @held = held_practices($portal, $mark); @held >= 4 },
			'four databases with a request held at the gate', 30),
		'gated phase: four requests in flight, one per written database ('
		  . join(', ', @held) . ')');
	$sample->();
	$node->safe_psql($fifth,
		"SELECT pstest.make_patient($GATE_PATIENT); SELECT pstest.book($GATE_PATIENT);");
	my $st;
	ok(ps_wait_until(sub { $st = ps_status($node, $fifth); $st->{state} eq 'waiting_for_worker' },
			"$fifth waiting_for_worker", 30),
		'status said waiting_for_worker while a database waited (state: '
		  . ($st->{state} // '?') . ')');
	like($st->{last_error} // '', qr/waiting for a turn of a delivery worker/,
		'last_error says it waits for a turn');
	diag("gated phase: $fifth said: " . ($st->{last_error} // '(no last_error)'));
	$sample->();
	$portal->open_gate('hold');
	$portal->mode({ mode => 'delay', seconds => 0.3 });
	ok(all_drained($node, [ @gated, $fifth ], 60),
		'gated phase: after the gate opened, the five databases drained');
	ps_set_conf($node, 'portal_sync.http_timeout' => undef);
	ok(ps_wait_until(sub { $node->safe_psql('postgres', 'SHOW portal_sync.http_timeout') eq '2s' },
			'http_timeout back', 30),
		'gated phase: http_timeout back to 2s');
	# only the random polls of the rounds below are counted
	($seen_waiting, $waiting_error) = (0, '');
}
for my $round (1 .. $rounds)
{
	for my $i (0 .. $#dbs)
	{
		my $db = $dbs[$i];
		my $first = ($round - 1) * 5 + 1;
		my $last = $round * 5;
		# new patients enrolled (snapshots), and changes of earlier ones
		$node->safe_psql($db,
			"SELECT pstest.make_patient(i) FROM generate_series($first, $last) i;"
			  . " SELECT pstest.book(i) FROM generate_series($first, $last) i;"
			  . " UPDATE ehr.medication SET dose = dose || ' r$round' WHERE patient_id < $first;");
		# look at the databases written a moment ago, while they wait
		my $look = $dbs[ ($i + 10) % @dbs ];
		my $st = ps_status($node, $look);
		if ($st->{state} eq 'waiting_for_worker')
		{
			$seen_waiting++;
			$waiting_error = $st->{last_error} // '';
		}
		$sample->();
	}
}
ok(all_drained($node, \@dbs, 180), '20 databases, 4 workers: every database drained');
$portal->mode({ mode => 'ok' });
for my $db (@dbs)
{
	ps_compare_state($node, $db, $portal, "$db holds exactly what it shares");
}
ps_check_accepted_once($portal, '20 databases');
# information only: whether the random polls caught a database waiting
# depends on the machine's speed (the gated phase above asserts it)
diag("random polls of the rounds: status said waiting_for_worker $seen_waiting times"
	  . ($waiting_error ne '' ? " (last_error: $waiting_error)" : ''));
cmp_ok($most_workers, '<=', 4, "never more workers than max_workers (at most $most_workers seen)");

my ($worst, $worst_db) = (-1, '');
my @waits;
for my $db (@dbs)
{
	my $w = max_turn_wait($node, $db);
	push @waits, sprintf('%s %.1f', $db, $w);
	($worst, $worst_db) = ($w, $db) if $w > $worst;
}
diag('enrolled -> snapshot accepted, worst per database (s): ' . join(', ', @waits));
diag(sprintf('worst of all: %.1f s (%s)', $worst, $worst_db));
cmp_ok($worst, '>=', 0, 'every database has accepted snapshots');
cmp_ok($worst, '<', 30, 'no database waited more than 30 s for its turn (under load)');

# an idle database gives its slot up: a write in a database without a
# worker is served at once
my $quiet = $dbs[0];
$node->safe_psql($quiet, q{SELECT pstest.make_patient(1000); SELECT pstest.book(1000);});
ok(ps_wait_until(sub { ps_query($node, $quiet, q{SELECT portal_sync.is_ready('1000')}) eq 't' },
		'late patient ready', 30),
	'a write to an idle database is delivered after the burst');
$sample->();
is($no_ext_workers, 0, 'no worker seen in the database without the extension');

# status of an idle database without a worker is not "waiting"
ok(ps_wait_until(sub { ps_status($node, $dbs[5])->{state} =~ /^(idle|not_running)$/ }, 'settled', 30),
	'a database with nothing pending does not wait for a worker');

# a copy of a database with the extension is found, while workers are
# short: its status soon says needs_adoption
$node->safe_psql('postgres', "CREATE DATABASE copy_of_02 TEMPLATE $dbs[1]");
ok(ps_wait_until(sub { ps_status($node, 'copy_of_02')->{state} eq 'needs_adoption' }, 'copy found', 30),
	'a copy made with CREATE DATABASE ... TEMPLATE says needs_adoption');

# a crash: the registry is read back, and every database is served with
# no CREATE EXTENSION
ok(ps_kill_worker($node, $dbs[0], (split /\n/,
	$node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'portal_sync worker' LIMIT 1"))[0]),
	'a worker killed: the server restarted');
for my $db (@dbs)
{
	$node->safe_psql($db, q{SELECT pstest.make_patient(2000); SELECT pstest.book(2000);});
}
ok(all_drained($node, \@dbs, 120), 'after the crash: every database drained');
for my $db (@dbs)
{
	is(ps_query($node, $db, q{SELECT portal_sync.is_ready('2000')}), 't', "after the crash: $db delivered");
}
ok(ps_wait_until(sub { ps_status($node, 'copy_of_02')->{state} eq 'needs_adoption' }, 'copy after crash', 30),
	'after the crash the copy still says needs_adoption');
$sample->();
is($no_ext_workers, 0, 'still no worker seen in the database without the extension');
$node->stop;

# ---------------------------------- 12 databases, slots short in the postmaster
my $portal2 = PortalSyncTest::Portal->start;
my $node2 = ps_new_node('slots', $portal2, no_setup => 1,
	conf => "portal_sync.max_workers = 8\nmax_worker_processes = 8\n"
	  . "max_parallel_workers = 0\nlog_min_messages = debug1\n");
ok(registry_written($node2), 'second node: registry written');
$node2->safe_psql('postgres', 'CREATE DATABASE no_ext');
my $no_ext_oid = $node2->safe_psql('postgres', "SELECT oid FROM pg_database WHERE datname = 'no_ext'");
my @dbs2 = map { sprintf('clinic_%02d', $_) } 1 .. 12;
for my $db (@dbs2)
{
	$node2->safe_psql('postgres', "CREATE DATABASE $db");
	ps_setup_db($node2, $db);
}
$portal2->mode({ mode => 'delay', seconds => 0.2 });
for my $pass (1 .. 2)
{
	for my $db (@dbs2)
	{
		my $base = $pass * 10;
		$node2->safe_psql($db,
			"SELECT pstest.make_patient(i) FROM generate_series($base, $base + 3) i;"
			  . " SELECT pstest.book(i) FROM generate_series($base, $base + 3) i;");
	}
	ok(all_drained($node2, \@dbs2, 180), "12 databases, 8 worker processes, pass $pass: all drained");
	for my $db (@dbs2)
	{
		ps_compare_state($node2, $db, $portal2, "pass $pass: $db exact");
	}
	my $worst2 = -1;
	$worst2 = List::Util::max($worst2, max_turn_wait($node2, $_)) for @dbs2;
	diag(sprintf('pass %d: worst enrolled -> accepted: %.1f s', $pass, $worst2));
	cmp_ok($worst2, '<', 30, "pass $pass: no database waited more than 30 s");
	# after a restart the registry is read back: every database is served
	# again without CREATE EXTENSION
	$node2->restart if $pass == 1;
}
ps_check_accepted_once($portal2, '12 databases');
my $log = slurp_file($node2->logfile);
my $registered = () = $log =~ /registering background worker "portal_sync worker for database \d+"/g;
cmp_ok($registered, '>', 0, "the postmaster's log shows worker registrations ($registered)");
unlike($log, qr/portal_sync worker for database $no_ext_oid"/,
	'no worker was ever registered for the database without the extension');
$node2->stop;

# ----------------------------------------------------------- promotion
# A database created with the extension after the standby's base backup
# is missing from the registry file the backup copied: after promotion
# (a new timeline) it is looked for, and served.  Nothing runs on the
# standby before.
my $portal3 = PortalSyncTest::Portal->start;
my $primary = ps_new_node('promo_primary', $portal3, no_setup => 1,
	init => { allows_streaming => 1 }, conf => "portal_sync.max_workers = 2\n");
ok(registry_written($primary), 'primary: registry written');
for my $db (qw(before_backup other_before))
{
	$primary->safe_psql('postgres', "CREATE DATABASE $db");
	ps_setup_db($primary, $db);
}
$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('promo_standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;
$primary->safe_psql('postgres', 'CREATE DATABASE after_backup');
ps_setup_db($primary, 'after_backup');
my @dbs3 = qw(before_backup other_before after_backup);
# the portal is down: what the primary captures stays pending
$portal3->down;
for my $db (@dbs3)
{
	$primary->safe_psql($db, q{SELECT pstest.make_patient(i) FROM generate_series(1, 5) i;
		SELECT pstest.book(i) FROM generate_series(1, 5) i;});
}
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'portal_sync%'"),
	'0', 'no launcher and no worker on the standby');
$primary->stop('immediate');
$standby->promote;
$portal3->up;
ok(all_drained($standby, \@dbs3, 120),
	'after promotion: every database drained, the one created after the backup too');
for my $db (@dbs3)
{
	ps_compare_state($standby, $db, $portal3, "after promotion: $db exact");
}
$standby->stop;

done_testing();
