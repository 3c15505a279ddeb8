
# Copyright (c) 2026, portal_sync developers
#
# Copies of a database (SPEC 6 "Copies"): CREATE DATABASE ... TEMPLATE
# copies the installation id; the copy keeps capturing but delivers nothing
# (status needs_adoption) while the original delivers on, also after a
# restart of the cluster.  adopt() is for superusers, and only in a copy;
# it gives the copy event ids of its own and sends its enrolled patients'
# records; the original's portal state stays exact.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('copies', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }
sub in_copy { return $node->safe_psql('copy_db', $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 6) i;
	  SELECT pstest.book(i) FROM generate_series(1, 4) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
my $original_id = one(q{SELECT install_id FROM portal_sync.installation});

my ($ret, $out, $err) = $node->psql('template1', 'CREATE DATABASE copy_db TEMPLATE postgres', timeout => 60);
is($ret, 0, 'CREATE DATABASE ... TEMPLATE') or diag($err);
is(in_copy(q{SELECT install_id FROM portal_sync.installation}), $original_id,
	'the copy carries the original\'s installation id');

ok(ps_wait_until(sub { (ps_status($node, 'copy_db')->{state} // '') eq 'needs_adoption' }, 'needs_adoption', 60),
	'the copy\'s status says needs_adoption');
like(ps_status($node, 'copy_db')->{last_error}, qr/adopt\(\)/, 'and says what to do');

# Both write; only the original delivers.
my $mark = ps_nreq($portal);
in_copy(q{UPDATE ehr.medication SET dose = 'TEST DATA from a copy' WHERE patient_id <= 4;
		  SELECT pstest.book(5)});
one(q{UPDATE ehr.medication SET dose = 'real change' WHERE patient_id <= 4});
ok(ps_wait_drained($node, $db), 'the original delivers');
ok(ps_wait_until(sub { ps_status($node, 'copy_db')->{pending_events} > 0 }, 'copy captures', 30),
	'the copy captures (events pending)');
sleep(2);
my @from_copy = grep { ($_->{data}{dose} // '') =~ /TEST DATA/ }
  map { @{ $_->{events} } } @{ $portal->requests(since => $mark, full => 1) };
is(scalar @from_copy, 0, 'nothing of the copy reached the portal');
ps_compare_state($node, $db, $portal, 'the original, with a copy beside it');

# A dump restored into another database is a copy too.
{
	my $dump = "$PostgreSQL::Test::Utils::tmp_check/copies.dump";
	ok(PostgreSQL::Test::Utils::run_log([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr($db) ]),
		'pg_dump of the original');
	$node->safe_psql('template1', 'CREATE DATABASE restored_db');
	PostgreSQL::Test::Utils::run_log([ 'pg_restore', '-d', $node->connstr('restored_db'), $dump ]);
	is($node->safe_psql('restored_db', q{SELECT install_id FROM portal_sync.installation}), $original_id,
		'the restored database carries the original\'s installation id (one row)');
	ok(ps_wait_until(sub { (ps_status($node, 'restored_db')->{state} // '') eq 'needs_adoption' },
		'restored needs_adoption', 60), 'the restored database\'s status says needs_adoption');
	$node->safe_psql('template1', 'DROP DATABASE restored_db');
}

# A copy whose CREATE DATABASE commits late (here: its commit waits for a
# synchronous standby that does not exist) is found at its commit, not at
# the launcher's next periodic scan a minute later.  Nothing here writes
# while the commit is held.
{
	# (a commit waits for a synchronous standby only where WAL senders may run)
	$node->append_conf('postgresql.conf', "wal_level = replica\nmax_wal_senders = 2");
	$node->restart;
	$node->append_conf('postgresql.conf', "synchronous_standby_names = 'nobody'");
	$node->reload;
	my $creator = $node->background_psql('template1', on_error_stop => 0);
	$creator->query_until(qr/creating/, "\\echo creating\nCREATE DATABASE copy_late TEMPLATE postgres;\n\\echo created\n");
	# (a connection to the template waits for the command: ask template1)
	ok(ps_wait_until(sub { $node->safe_psql('template1',
			q{SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'}) eq '1' }, 'commit held', 30),
		'the CREATE DATABASE waits at its commit')
	  or diag($node->safe_psql('template1', q{SELECT string_agg(concat_ws(' ', backend_type, datname, state, wait_event_type, wait_event, query), E'\n') FROM pg_stat_activity}));
	sleep(2);
	$node->append_conf('postgresql.conf', "synchronous_standby_names = ''");
	$node->reload;
	$creator->query_until(qr/created/, '');
	$creator->quit;
	ok(ps_wait_until(sub { (ps_status($node, 'copy_late')->{state} // '') eq 'needs_adoption' },
		'late copy needs_adoption', 30),
		'a copy whose CREATE DATABASE committed late says needs_adoption soon after its commit');
	$node->safe_psql('postgres', 'DROP DATABASE copy_late');
}

# A restart changes nothing: the original delivers with no action.
$node->restart;
one(q{UPDATE ehr.allergy SET reaction = 'after restart' WHERE patient_id <= 4});
ok(ps_wait_drained($node, $db), 'after a restart, the original delivers');
isnt(ps_status($node, $db)->{state}, 'needs_adoption', 'the original never needs adoption');
ok(ps_wait_until(sub { (ps_status($node, 'copy_db')->{state} // '') eq 'needs_adoption' }, 'still', 60),
	'after a restart, the copy still needs adoption');

# adopt(): superusers only, copies only.
$node->safe_psql('copy_db', q{CREATE ROLE dba_clerk LOGIN; GRANT USAGE ON SCHEMA portal_sync TO dba_clerk;
	GRANT EXECUTE ON FUNCTION portal_sync.adopt() TO dba_clerk});
($ret, $out, $err) = $node->psql('copy_db', 'SELECT portal_sync.adopt()', extra_params => [ '-U', 'dba_clerk' ]);
like($err, qr/only a superuser/, 'adopt() is refused to a role that is not a superuser');
($ret, $out, $err) = $node->psql($db, 'SELECT portal_sync.adopt()');
like($err, qr/not a copy/, 'adopt() is refused in the original');
is(one(q{SELECT install_id FROM portal_sync.installation}), $original_id, 'the original keeps its id');

# The copy becomes a practice of its own and adopts.
$mark = ps_nreq($portal);
in_copy(q{UPDATE portal_sync.settings SET practice_id = 'copy-practice'});
in_copy(q{SELECT portal_sync.adopt()});
my $copy_id = in_copy(q{SELECT install_id FROM portal_sync.installation});
isnt($copy_id, $original_id, 'adopt() gives the copy an installation id of its own');
ok(ps_wait_drained($node, 'copy_db'), 'the adopted copy delivers');
my @copy_events = map { @{ $_->{events} } } grep { ($_->{practice_id} // '') eq 'copy-practice' }
  @{ $portal->requests(since => $mark) };
ok(@copy_events > 0, 'the copy sent its events under its own practice');
is(scalar(grep { index($_->{event_id}, "$copy_id-") != 0 } @copy_events), 0,
	'every event id of the copy carries its own installation id');
ps_compare_state($node, 'copy_db', $portal, 'the adopted copy', practice => 'copy-practice');
ps_check_settled($node, $db, $portal, 'the original at the end');

$node->stop;
$portal->stop;
done_testing();
