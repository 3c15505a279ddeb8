
# Copyright (c) 2026, portal_sync developers
#
# Defect: "New deadlocks inside the EHR."
# SPEC v2 section 3: capture never makes two EHR transactions wait for or
# deadlock with each other where they would not without portal_sync.
# (Section 5, nobody waits for others; section 6, wait_ready.)
#
# Inserting appointments for two patients in two transactions, in
# opposite orders, touches different rows of ehr.appointment (the FK check
# of ehr.patient takes a shared lock): without portal_sync it never
# conflicts.  Here each first appointment of a patient is its initiating
# event, so the patients are enrolled by the very transactions that cross.
#
#   A: T1 books 7, T2 books 8, T1 books 8, T2 books 7, both commit;
#   B: T1 and T2 book the same new patient 9, both open at once, both
#      commit.
#
# With lock_timeout = 5s (deadlock_timeout default 1s) every statement
# must succeed, both transactions commit, every appointment is in the
# database, and the patients end up ready (an accepted snapshot each).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('deadlock', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 1) FROM generate_series(1, 12) i;
	  SELECT pstest.book(i) FROM generate_series(1, 2) i;});
ok(ps_wait_drained($node, $db, 60), 'initial drain');
is(one(q{SELECT count(*) FROM portal_sync.patients WHERE patient_id IN ('7', '8', '9', '10', '11')}),
	'0', 'patients 7 to 11 are not enrolled yet');

# A session that goes on after errors, with lock_timeout.
sub session
{
	my $s = $node->background_psql($db, on_error_stop => 0);
	$s->query(q{SET lock_timeout = '5s'});
	$s->{stderr} = '';
	return $s;
}

# Send a statement without waiting for it; collect its result later.
my $tagno = 0;
sub send_async
{
	my ($s, $sql) = @_;
	my $tag = 'async_done_' . ++$tagno;
	$s->{timeout}->start;    # the session's IPC::Run timer: per statement
	$s->{stdin} .= "$sql\n;\n\\echo '$tag'\n\\warn '$tag'\n";
	$s->{run}->pump_nb;
	return $tag;
}

# (finished, stdout, stderr) of a statement sent by send_async.
sub collect
{
	my ($s, $tag, $timeout) = @_;
	my $deadline = time() + $timeout;
	my $re = qr/\r?\n?\Q$tag\E\r?\n/;
	while (!($s->{stdout} =~ $re && $s->{stderr} =~ $re))
	{
		return (0, $s->{stdout}, $s->{stderr}) if time() > $deadline;
		$s->{run}->pump_nb;
		usleep(20_000);
	}
	my ($out) = split $re, $s->{stdout}, 2;
	my ($err) = split $re, $s->{stderr}, 2;
	$s->{stdout} = '';
	$s->{stderr} = '';
	return (1, $out // '', $err // '');
}

# Run a statement and wait for it (up to 30 s); returns its stderr.
sub run_sql
{
	my ($s, $sql) = @_;
	my ($done, $out, $err) = collect($s, send_async($s, $sql), 30);
	return $done ? $err : "did not finish within 30 s; $err";
}

# BEGIN a transaction and return its xid.
sub begin_xact
{
	my ($s) = @_;
	my ($done, $out, $err) = collect($s, send_async($s, 'BEGIN; SELECT txid_current()'), 30);
	die "BEGIN failed: $err" unless $done && $err eq '' && $out =~ /^(\d+)$/m;
	return $1;
}

# The transaction's fate, seen from a fresh connection.
sub committed
{
	my ($xid) = @_;
	return ps_query($node, $db, "SELECT txid_status($xid)") eq 'committed';
}

sub appts
{
	my ($p) = @_;
	return one(qq{SELECT count(*) FROM ehr.appointment WHERE patient_id = $p});
}

# ---------------------------------------------------------------- A: crossing enrollments
my ($n7, $n8) = (appts(7), appts(8));
my $t1 = session();
my $t2 = session();
my $x1 = begin_xact($t1);
is(run_sql($t1, 'SELECT pstest.book(7)'), '', 'A: T1 books patient 7');
my $x2 = begin_xact($t2);
is(run_sql($t2, 'SELECT pstest.book(8)'), '', 'A: T2 books patient 8');
my $tag1 = send_async($t1, 'SELECT pstest.book(8)');
# T1 may be waiting now; T2 crosses.
usleep(300_000);
my $tag2 = send_async($t2, 'SELECT pstest.book(7)');
my ($d1, $o1, $e1) = collect($t1, $tag1, 30);
my ($d2, $o2, $e2) = collect($t2, $tag2, 30);
ok($d1 && $e1 eq '', 'A: T1 books patient 8 (enrolled by T2, uncommitted) without error')
  or diag("T1: " . ($d1 ? $e1 : 'still waiting after 30 s'));
ok($d2 && $e2 eq '', 'A: T2 books patient 7 (enrolled by T1, uncommitted) without error')
  or diag("T2: " . ($d2 ? $e2 : 'still waiting after 30 s'));
run_sql($t1, 'COMMIT');
run_sql($t2, 'COMMIT');
ok(committed($x1), 'A: T1 commits');
ok(committed($x2), 'A: T2 commits');
is(appts(7), $n7 + 2, 'A: both appointments of patient 7 are in the database');
is(appts(8), $n8 + 2, 'A: both appointments of patient 8 are in the database');
for my $p (7, 8)
{
	is(ps_query($node, $db, qq{SELECT portal_sync.wait_ready('$p', '60s')}), 't',
		"A: patient $p is ready (wait_ready from a fresh connection)");
}

# Same with T2 the first to cross (the other order of waits).
my ($n10, $n11) = (appts(10), appts(11));
$x1 = begin_xact($t1);
is(run_sql($t1, 'SELECT pstest.book(10)'), '', 'A2: T1 books patient 10');
$x2 = begin_xact($t2);
is(run_sql($t2, 'SELECT pstest.book(11)'), '', 'A2: T2 books patient 11');
$tag2 = send_async($t2, 'SELECT pstest.book(10)');
usleep(300_000);
$tag1 = send_async($t1, 'SELECT pstest.book(11)');
($d2, $o2, $e2) = collect($t2, $tag2, 30);
($d1, $o1, $e1) = collect($t1, $tag1, 30);
ok($d2 && $e2 eq '', 'A2: T2 books patient 10 (enrolled by T1, uncommitted) without error')
  or diag("T2: " . ($d2 ? $e2 : 'still waiting after 30 s'));
ok($d1 && $e1 eq '', 'A2: T1 books patient 11 (enrolled by T2, uncommitted) without error')
  or diag("T1: " . ($d1 ? $e1 : 'still waiting after 30 s'));
run_sql($t2, 'COMMIT');
run_sql($t1, 'COMMIT');
ok(committed($x2), 'A2: T2 commits');
ok(committed($x1), 'A2: T1 commits');
is(appts(10), $n10 + 2, 'A2: both appointments of patient 10 are in the database');
is(appts(11), $n11 + 2, 'A2: both appointments of patient 11 are in the database');
for my $p (10, 11)
{
	is(ps_query($node, $db, qq{SELECT portal_sync.wait_ready('$p', '60s')}), 't',
		"A2: patient $p is ready (wait_ready from a fresh connection)");
}

# ---------------------------------------------------------------- B: the same patient twice at once
my $n9 = appts(9);
my $mark = ps_nreq($portal);
$x1 = begin_xact($t1);
is(run_sql($t1, 'SELECT pstest.book(9)'), '', 'B: T1 books patient 9');
$x2 = begin_xact($t2);
is(run_sql($t2, 'SELECT pstest.book(9)'), '',
	'B: T2 books patient 9 while T1 (which enrolled it) is open: no wait, no lock timeout');
run_sql($t1, 'COMMIT');
run_sql($t2, 'COMMIT');
ok(committed($x1), 'B: T1 commits');
ok(committed($x2), 'B: T2 commits');
is(appts(9), $n9 + 2, 'B: both appointments of patient 9 are in the database');
is(ps_query($node, $db, q{SELECT portal_sync.wait_ready('9', '60s')}), 't',
	'B: patient 9 is ready (wait_ready from a fresh connection)');
ok(ps_wait_drained($node, $db, 60), 'drained');
my $snaps = grep { $_->{op} eq 'snapshot_end' }
  @{ ps_events($portal->requests(since => $mark), accepted => 1, patient => '9') };
# Both transactions queued an enrollment request (neither saw the other's).
# Read together, they are one snapshot; when the worker serves T1's before
# T2 commits (it need not wait for T2, whose writes of patient 9 were all
# recorded), T2's is a second one, harmless (CI under the sanitizers).
ok($snaps >= 1 && $snaps <= 2, "B: patient 9 gets one snapshot accepted per enrollment request at most ($snaps)");
is($portal->state->{practices}{$db}{patients}{9}{snapshots}, $snaps,
	'B: the portal applied each of them');

ps_compare_state($node, $db, $portal, 'at the end');
ps_check_portal_invariants($portal, 'at the end');
is(scalar @{ ps_dead_letters($node, $db) }, 0, 'nothing dead-lettered');

$t1->quit;
$t2->quit;
$node->stop;
$portal->stop;
done_testing();
