
# Copyright (c) 2026, portal_sync developers
#
# One launcher, one worker per database with the extension (SPEC 2): a
# database where CREATE EXTENSION runs later is picked up without a restart
# and delivers under its own practice_id; the first database keeps flowing;
# DROP EXTENSION stops that database's worker.  Also: without the preload,
# CREATE EXTENSION fails with a hint; an empty endpoint idles as
# "unconfigured" while events queue.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('twodb', $portal);

$node->safe_psql('postgres', q{SELECT pstest.make_patient(i) FROM generate_series(1, 5) i;
	SELECT pstest.book(i) FROM generate_series(1, 3) i;});
ok(ps_wait_drained($node, 'postgres'), 'first database drained');

$node->safe_psql('postgres', 'CREATE DATABASE clinic_b');
$node->safe_psql('postgres', 'CREATE DATABASE no_ext');
ok(!ps_worker_pid($node, 'clinic_b'), 'no worker before CREATE EXTENSION');

ps_setup_db($node, 'clinic_b');
ok(ps_wait_until(sub { ps_worker_pid($node, 'clinic_b') }, 'worker for clinic_b', 60),
	'a worker starts for the new database without a restart');
ok(ps_worker_pid($node, 'postgres'), 'the first database keeps its worker');
ok(!ps_worker_pid($node, 'no_ext'), 'no worker for a database without the extension');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'portal_sync launcher'"),
	'1', 'still one launcher');

$node->safe_psql('clinic_b', q{SELECT pstest.make_patient(i) FROM generate_series(1, 4) i;
	SELECT pstest.book(i) FROM generate_series(2, 4) i;
	UPDATE ehr.medication SET dose = 'clinic b dose' WHERE patient_id = 2;});
$node->safe_psql('postgres', q{UPDATE ehr.medication SET dose = 'clinic a dose' WHERE patient_id = 2});
ok(ps_wait_drained($node, 'clinic_b'), 'second database drained');
ok(ps_wait_drained($node, 'postgres'), 'first database drained again');
my $st = $portal->state;
ok($st->{practices}{clinic_b}, 'the portal received practice clinic_b');
ps_compare_state($node, 'clinic_b', $portal, 'clinic_b');
ps_compare_state($node, 'postgres', $portal, 'postgres');
is(ps_query($node, 'clinic_b', q{SELECT portal_sync.is_ready('3')}), 't', 'clinic_b patient ready');

# practice_id of a database is its own setting.
$node->safe_psql('clinic_b', q{UPDATE portal_sync.settings SET practice_id = 'practice-b'});
$node->safe_psql('clinic_b', q{SELECT pstest.book(1)});
ok(ps_wait_drained($node, 'clinic_b'), 'drained after practice_id change');
ok($portal->state->{practices}{'practice-b'}{patients}{1}, 'later events carry the new practice_id');

# DROP EXTENSION: the worker of that database goes away; the other stays.
my $pid_b = ps_worker_pid($node, 'clinic_b');
$node->safe_psql('clinic_b', 'DROP EXTENSION portal_sync CASCADE');
ok(ps_wait_until(sub { !ps_worker_pid($node, 'clinic_b') }, 'clinic_b worker gone', 60),
	'DROP EXTENSION stops the database\'s worker');
ok(ps_worker_pid($node, 'postgres'), 'the other worker keeps running');
my ($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE clinic_b');
is($ret, 0, 'the database can then be dropped') or diag($err);

# ---------------------------------------------------------------- unconfigured
ps_set_conf($node, 'portal_sync.endpoint' => '');
ok(ps_wait_until(sub { ps_status($node, 'postgres')->{state} eq 'unconfigured' }, 'unconfigured', 30),
	'empty endpoint: status says unconfigured');
my $mark = scalar @{ $portal->requests };
$node->safe_psql('postgres', q{UPDATE ehr.allergy SET reaction = 'queued' WHERE patient_id = 1});
ok(ps_wait_until(sub { ps_status($node, 'postgres')->{pending_events} > 0 }, 'queued', 10),
	'events keep queueing');
ps_set_conf($node, 'portal_sync.endpoint' => $portal->url . '/events');
ok(ps_wait_drained($node, 'postgres'), 'endpoint set by reload: drained');
ok(scalar @{ $portal->requests(since => $mark) }, 'sent after the reload');
ps_compare_state($node, 'postgres', $portal, 'after unconfigured');

# ---------------------------------------------------------------- no preload
my $bare = PostgreSQL::Test::Cluster->new('nopreload');
$bare->init;
$bare->start;
($ret, $out, $err) = $bare->psql('postgres', 'CREATE EXTENSION portal_sync');
isnt($ret, 0, 'CREATE EXTENSION without the preload fails');
like($err, qr/shared_preload_libraries/, 'with a hint about shared_preload_libraries');
$bare->stop;

ps_check_portal_invariants($portal, 'two databases');
$node->stop;
$portal->stop;
done_testing();
