
# Copyright (c) 2026, portal_sync developers
#
# Defect (issue 13): after DROP EXTENSION portal_sync CASCADE and CREATE
# EXTENSION, seq started again at 1, so a portal that orders a practice's
# events by seq saw it go backwards.  SPEC v2 section 5: seq grows per
# database; it must never go backwards for a practice_id.
#
# The same database (same practice_id) is installed three times; the
# patients of the first installation are enrolled again in the later ones
# and keep changing, while a writer keeps writing and delivery runs.  Every
# seq the portal accepted from a later installation is above every seq of
# the earlier ones, and the portal's per-patient order check (which keeps
# each patient's last seq across installations) never fires.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('seq_never_backwards', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }
my $root = ps_root();

# The seqs the portal accepted so far, and the highest of them.
sub accepted_seqs
{
	my @seqs = map { $_->{seq} } @{ ps_accepted_events($portal->requests) };
	return \@seqs;
}

sub max_of { my $m; for (@{ $_[0] }) { $m = $_ if !defined $m || $_ > $m } return $m }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 6) i;
	  SELECT pstest.book(i) FROM generate_series(1, 6) i;});
ok(ps_wait_drained($node, $db, 60), 'the first installation drains');
my $ceiling = max_of(accepted_seqs());
ok(defined $ceiling, "the first installation's highest accepted seq: " . ($ceiling // 'none'));

for my $round (2 .. 3)
{
	my $before = scalar @{ accepted_seqs() };
	my ($ret, $out, $err) = $node->psql($db, 'DROP EXTENSION portal_sync CASCADE', timeout => 60);
	is($ret, 0, "round $round: DROP EXTENSION ... CASCADE") or diag($err);
	($ret, $out, $err) = $node->psql($db, 'CREATE EXTENSION portal_sync', timeout => 60);
	is($ret, 0, "round $round: CREATE EXTENSION again") or diag($err);
	($ret, $out, $err) = $node->psql($db, slurp_file("$root/test/attach_reference.sql"),
		on_error_stop => 1, timeout => 60);
	is($ret, 0, "round $round: the reference tables attached again") or diag($err);
	is(one(q{SELECT practice_id FROM portal_sync.settings}), $db,
		"round $round: the same practice_id");

	# The same patients enroll again and change, in many transactions.
	for my $i (1 .. 6)
	{
		one(qq{SELECT pstest.book($i)});
		one(qq{UPDATE ehr.medication SET dose = 'round $round $i' WHERE patient_id = $i});
		one(qq{UPDATE ehr.insurance SET plan_name = 'Plan $round $i' WHERE patient_id = $i});
	}
	ok(ps_wait_drained($node, $db, 60), "round $round: drained");

	my $seqs = accepted_seqs();
	my @new = @$seqs[ $before .. $#$seqs ];
	ok(@new > 6, "round $round: the new installation's events were accepted (" . scalar(@new) . ')');
	my @below = grep { $_ <= $ceiling } @new;
	is(scalar @below, 0,
		"round $round: every seq of the new installation is above the earlier ones' highest ($ceiling)")
	  or diag("lowest new seq: " . (sort { $a <=> $b } @new)[0]);
	$ceiling = max_of(\@new);
	ok($ceiling < 2**53, "round $round: seq stays below 2^53, exact in every JSON parser");
	ps_compare_state($node, $db, $portal, "round $round: the portal holds the database's shareable state");
}
ps_check_portal_invariants($portal, 'three installations of one practice');

# A copy (a migration: the original goes on sending after the copy was
# made) adopted as the practice's stream goes on above every seq the
# original sent, though its sequence was copied at the copy's moment.
one(q{CREATE DATABASE copy_db TEMPLATE postgres});
one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(7, 9) i;
	  SELECT pstest.book(i) FROM generate_series(7, 9) i;});
ok(ps_wait_drained($node, $db, 60), 'the original drains after the copy was made');
$ceiling = max_of(accepted_seqs());
$node->safe_psql('copy_db', q{SELECT portal_sync.adopt()});
my $first_of_copy = $node->safe_psql('copy_db', q{SELECT nextval('portal_sync.outbox_seq')});
ok($first_of_copy > $ceiling,
	"the adopted copy's next seq ($first_of_copy) is above every seq the original sent ($ceiling)");

$node->stop;
$portal->stop;
done_testing();
