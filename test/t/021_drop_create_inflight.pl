
# Copyright (c) 2026, portal_sync developers
#
# Defect: "DROP/CREATE EXTENSION while a request is in flight deletes
# unsent events."
# SPEC v2 section 5: nothing accepted is lost and nothing unaccepted is
# dropped across DROP EXTENSION / CREATE EXTENSION while a request is in
# flight.
#
# The portal holds the first batch of an installation for 10 s (within
# http_timeout, raised to 20 s here, so the worker will hear it accepted).
# Meanwhile the extension is dropped and created again, the reference
# tables are attached again, and the new installation (practice_id
# 'reinstalled') enrolls patients and captures changes.  Then the portal
# answers the old batch.  Every event of the new installation must reach
# the portal: its state for practice 'reinstalled' equals the database's
# shareable state once drained.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $hold = 10;
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('drop_create', $portal, conf => q{
portal_sync.http_timeout = '20s'
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }
my $root = ps_root();

ok(ps_wait_until(sub { ps_worker_pid($node, $db) }, 'worker', 30), 'a worker runs');

# The first batch of the first installation is held by the portal (and
# then applied and answered 200).
$portal->modes(
	{ mode => 'hang', seconds => $hold, apply => JSON::PP::true, count => 1 });
one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 12) i;
	  SELECT pstest.book(i) FROM generate_series(1, 4) i;});
my $held;
ok(ps_wait_until(sub { my $r = $portal->requests; $held = $r->[0] if @$r; @$r }, 'request in flight', 30),
	'the first batch is in flight (held by the portal)');
my $t_sent = time();

# DROP and CREATE while it is held; attach again; the new installation
# gets its own practice id so that its state can be compared alone.
my ($ret, $out, $err) = $node->psql($db, 'DROP EXTENSION portal_sync CASCADE', timeout => 60);
is($ret, 0, 'DROP EXTENSION while a request is in flight') or diag($err);
($ret, $out, $err) = $node->psql($db, 'CREATE EXTENSION portal_sync', timeout => 60);
is($ret, 0, 'CREATE EXTENSION again') or diag($err);
($ret, $out, $err) = $node->psql($db, slurp_file("$root/test/attach_reference.sql"),
	on_error_stop => 1, timeout => 60);
is($ret, 0, 'the reference tables attached again') or diag($err);
one(q{UPDATE portal_sync.settings SET practice_id = 'reinstalled'});

# The new installation's events: enrollments (snapshots), changes of
# enrolled patients, insurance of every patient.  More events than the
# held batch carried, in many transactions.
for my $i (1 .. 8)
{
	one(qq{SELECT pstest.book($i)});
	one(qq{UPDATE ehr.medication SET dose = 'reinstalled $i' WHERE patient_id = $i});
	one(qq{UPDATE ehr.insurance SET plan_name = 'Plan $i' WHERE patient_id IN ($i, @{[ $i + 4 ]})});
}
one(q{UPDATE ehr.allergy SET reaction = 'reinstalled' WHERE patient_id <= 8;
	  UPDATE ehr.vital_sign SET pulse = pulse + 1 WHERE patient_id <= 8;
	  DELETE FROM ehr.immunization WHERE patient_id IN (2, 3);});
my $t_written = time();

# Test premise: all of this happened while the old batch was still held.
my $answered;
ok(ps_wait_until(sub { $answered = $portal->requests->[0]{answered_at} }, 'held batch answered', 60),
	'the portal answered the held batch');
ok($answered > $t_written,
	sprintf('premise: the new installation wrote its events while the old batch was held (%.1fs of %ds)',
		$t_written - $t_sent, $hold))
  or diag(sprintf('answered %.1fs after it was sent, writes done after %.1fs', $answered - $t_sent, $t_written - $t_sent));

ok(ps_wait_drained($node, $db, 60), 'the new installation drains');
ps_compare_state($node, $db, $portal, 'every event of the new installation delivered',
	practice => 'reinstalled');
ps_check_portal_invariants($portal, 'after DROP/CREATE in flight');
is(scalar @{ ps_dead_letters($node, $db) }, 0, 'nothing dead-lettered');

# And it keeps flowing.
one(q{UPDATE ehr.medication SET dose = 'later' WHERE patient_id = 1});
ok(ps_wait_drained($node, $db, 60), 'drained after a later change');
ps_compare_state($node, $db, $portal, 'a later change of the new installation',
	practice => 'reinstalled');

$node->stop;
$portal->stop;
done_testing();
