
# Copyright (c) 2026, portal_sync developers
#
# Commands that need a database without connections (DROP DATABASE,
# ALTER DATABASE ... RENAME, CREATE DATABASE ... TEMPLATE) against the
# delivery worker (SPEC 6: no role without the right to drop a database can
# pause or stop its worker).
#
# - A role that may not drop the database runs each of them: the command
#   fails on its own permission check and the worker is untouched (same
#   pid, changes keep flowing at once).
# - A superuser copies the database: the worker gets out of the way, and
#   is back as soon as the command ends, not after a fixed pause; also
#   when the command fails.
# - The copy can be dropped while its worker runs.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('database_commands', $portal);
my $db = 'postgres';

$node->safe_psql($db, q{SELECT pstest.make_patient(i) FROM generate_series(1, 6) i;
	SELECT pstest.book(i) FROM generate_series(1, 4) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial state');

$node->safe_psql($db, q{CREATE ROLE clerk LOGIN});
my $pid = ps_worker_pid($node, $db);
ok($pid, 'the worker runs');

# A change is delivered promptly (the worker is not kept away): a timeout
# well below any pause a command could leave behind.
my $round = 0;
sub change_is_delivered
{
	my ($name) = @_;
	$round++;
	$node->safe_psql($db, qq{UPDATE ehr.medication SET dose = 'round $round' WHERE patient_id = 2});
	ok(ps_wait_drained($node, $db, 15), "$name: the next change is delivered at once");
}

# ---------------------------------------------------------------- no right
for my $command (
	[ 'DROP DATABASE', 'DROP DATABASE postgres', qr/must be owner/ ],
	[ 'ALTER DATABASE RENAME', 'ALTER DATABASE postgres RENAME TO renamed', qr/must be owner|permission denied/ ],
	[ 'ALTER DATABASE SET TABLESPACE', 'ALTER DATABASE postgres SET TABLESPACE pg_default', qr/must be owner/ ],
	[ 'CREATE DATABASE TEMPLATE', 'CREATE DATABASE copy_by_clerk TEMPLATE postgres', qr/permission denied/ ])
{
	my ($name, $sql, $error) = @$command;
	my ($ret, $out, $err) = $node->psql('template1', $sql, extra_params => [ '-U', 'clerk' ]);
	isnt($ret, 0, "clerk: $name is refused");
	like($err, $error, "clerk: $name fails on its permission check");
	is(ps_worker_pid($node, $db), $pid, "clerk: $name leaves the worker running");
	change_is_delivered("clerk: $name");
	is(ps_worker_pid($node, $db), $pid, "clerk: $name: still the same worker");
}

# ---------------------------------------------------------------- permitted
my ($ret, $out, $err) = $node->psql('template1', 'CREATE DATABASE copy_db TEMPLATE postgres', timeout => 60);
is($ret, 0, 'superuser: CREATE DATABASE ... TEMPLATE succeeds while the worker runs') or diag($err);
change_is_delivered('after CREATE DATABASE ... TEMPLATE');
isnt(ps_worker_pid($node, $db), $pid, 'the worker was restarted for the copy');

# The same command failing (the name is taken): the worker is back at once too.
($ret, $out, $err) = $node->psql('template1', 'CREATE DATABASE copy_db TEMPLATE postgres', timeout => 60);
like($err, qr/already exists/, 'a failing CREATE DATABASE ... TEMPLATE');
change_is_delivered('after a failed CREATE DATABASE ... TEMPLATE');

# The copy has a worker of its own; DROP DATABASE gets it out of the way.
ok(ps_wait_until(sub { ps_worker_pid($node, 'copy_db') }, 'worker for the copy', 60),
	'the copy has a worker');
($ret, $out, $err) = $node->psql('template1', 'DROP DATABASE copy_db', timeout => 60);
is($ret, 0, 'DROP DATABASE of the copy succeeds while its worker runs') or diag($err);
change_is_delivered('after DROP DATABASE of the copy');

ps_check_settled($node, $db, $portal, 'at the end', resends => 1);

$node->stop;
$portal->stop;
done_testing();
