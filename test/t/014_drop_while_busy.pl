
# Copyright (c) 2026, portal_sync developers
#
# DROP EXTENSION and DROP DATABASE while the worker is busy (a request in
# flight to a slow portal, a backlog pending): both succeed promptly, the
# worker of that database goes away, nothing is sent for the dropped
# database afterwards, and the other database keeps delivering and ends
# settled.  Then the extension is created again in a fresh database and
# works.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('drop_busy', $portal, conf => q{
portal_sync.batch_size = 10
});
$node->safe_psql('postgres', q{SELECT pstest.make_patient(i, 1) FROM generate_series(1, 5) i; SELECT pstest.book(1);});
ok(ps_wait_drained($node, 'postgres'), 'postgres drained');

for my $c (qw(drop_ext drop_db))
{
	$node->safe_psql('postgres', "CREATE DATABASE $c");
	ps_setup_db($node, $c);
	$node->safe_psql($c, "UPDATE portal_sync.settings SET practice_id = '$c'");
	ok(ps_wait_until(sub { ps_worker_pid($node, $c) }, "worker for $c", 60), "worker for $c");
}

sub busy
{
	my ($dbname) = @_;
	# Every request hangs 4 s (http_timeout is 2 s): the worker is always busy.
	$portal->modes({ mode => 'hang', seconds => 4, apply => JSON::PP::false,
		match => undef });
	$node->safe_psql($dbname, q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 30) i;
		SELECT pstest.book(i) FROM generate_series(1, 30) i;});
	my $mark = ps_nreq($portal);
	ps_wait_until(sub { grep { ($_->{practice_id} // '') eq $dbname } @{ $portal->requests(since => 0) } },
		"request in flight for $dbname", 30);
}

# ---------------------------------------------------------------- DROP EXTENSION
busy('drop_ext');
my $pid = ps_worker_pid($node, 'drop_ext');
ok($pid, 'drop_ext worker busy');
my $t0 = time();
my ($ret, $out, $err) = $node->psql('drop_ext', 'DROP EXTENSION portal_sync CASCADE', timeout => 60);
is($ret, 0, 'DROP EXTENSION while the worker is busy succeeds') or diag($err);
cmp_ok(time() - $t0, '<', 15, sprintf('and promptly (%.1fs)', time() - $t0));
ok(ps_wait_until(sub { !ps_worker_pid($node, 'drop_ext') }, 'drop_ext worker gone', 30),
	'the worker of the database goes away');
($ret, $out, $err) = $node->psql('drop_ext', q{INSERT INTO ehr.medication (patient_id, drug_name) VALUES (1, 'after drop')});
is($ret, 0, 'the EHR keeps writing its (formerly attached) tables') or diag($err);

# ---------------------------------------------------------------- DROP DATABASE
busy('drop_db');
ok(ps_worker_pid($node, 'drop_db'), 'drop_db worker busy');
$t0 = time();
($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE drop_db', timeout => 60);
is($ret, 0, 'DROP DATABASE while its worker is busy succeeds (the worker does not block it)') or diag($err);
cmp_ok(time() - $t0, '<', 15, sprintf('and promptly (%.1fs)', time() - $t0));
ok(ps_wait_until(sub { !ps_worker_pid($node, 'drop_db') }, 'drop_db worker gone', 30), 'its worker is gone');

# Nothing for the dropped databases after the drops.
$portal->mode({ mode => 'ok' });
sleep(5);
my $t_after = time();
sleep(3);
my @late = grep { $_->{time} > $t_after && ($_->{practice_id} // '') =~ /^drop_/ } @{ $portal->requests };
is(scalar @late, 0, 'nothing is sent for the dropped databases afterwards');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'portal_sync launcher'"),
	'1', 'the launcher survives');

# The other database keeps delivering.
my $mark = ps_nreq($portal);
$node->safe_psql('postgres', q{UPDATE ehr.medication SET dose = 'still flowing' WHERE patient_id = 1});
ps_check_settled($node, 'postgres', $portal, 'postgres after the drops', since => $mark, resends => 1);

# Created again, in a new database: works.
$node->safe_psql('postgres', 'CREATE DATABASE again');
ps_setup_db($node, 'again');
$node->safe_psql('again', q{SELECT pstest.make_patient(i, 1) FROM generate_series(1, 3) i; SELECT pstest.book(2);});
ps_check_settled($node, 'again', $portal, 'a database created after the drops', resends => 1);

$node->stop;
$portal->stop;
done_testing();
