
# Copyright (c) 2026, portal_sync developers
#
# A share_when that raises an error on some rows (SPEC 4): those rows are
# withheld (a delete if the portal holds them), the error's SQLSTATE is
# counted in status.rule_errors and shown by explain, and every other row
# and patient keeps flowing: no backoff, while the EHR keeps writing.  The
# rule is a cast of a free-text column (lab value 'pending' is not a
# number).  Also: status.capture_disabled and explain name a table whose
# capture trigger is disabled.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('rule_errors', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 8) i;
	  SELECT pstest.book(i) FROM generate_series(1, 6) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial state');

# Every patient has a lab whose value is 'pending': the rule fails there.
my $mark = ps_nreq($portal);
one(q{SELECT portal_sync.attach('ehr.lab_result', 'clinical', 'patient_id',
		date_col => 'result_date', share_when => 'value::numeric >= 0')});
one(q{UPDATE ehr.lab_result SET status = 'final'});
one(q{SELECT portal_sync.resync_all()});
one(q{UPDATE ehr.medication SET dose = 'after the rule' WHERE patient_id <= 6});
ok(ps_wait_drained($node, $db), 'a rule that fails on some rows: drained');
my $s = ps_status($node, $db);
cmp_ok($s->{rule_errors}, '>', 0, "status.rule_errors counts the failures ($s->{rule_errors})");
is($s->{consecutive_failures}, 0, 'no backoff: no failure counted');
is($s->{state}, 'idle', 'status: idle');
ps_compare_state($node, $db, $portal, 'rows the rule fails on are withheld, the rest flows');
my $sqlstates = one(q{SELECT string_agg(DISTINCT sqlstate, ',') FROM portal_sync.rule_error});
is($sqlstates, '22P02', 'the SQLSTATE is recorded (invalid_text_representation)');

my ($withheld) = grep { /lab_result/ } split /\n/,
  one(q{SELECT detail FROM portal_sync.explain('2') WHERE step = 'withheld'});
like($withheld, qr/1 by rule errors \(SQLSTATE 22P02\)/, 'explain: the lab withheld by a rule error, with its SQLSTATE');
unlike($withheld, qr/pending/, 'explain does not quote the row');

# The EHR writes on, also the rows the rule fails on.
one(q{UPDATE ehr.lab_result SET units = 'mg/dL' WHERE patient_id IN (1, 2)});
one(q{UPDATE ehr.lab_result SET value = '7' WHERE patient_id = 3 AND value = 'pending'});
one(q{SELECT pstest.make_patient(20, 2); SELECT pstest.book(20)});
ok(ps_wait_drained($node, $db), 'later changes: drained');
ps_compare_state($node, $db, $portal, 'later changes');
ok(ps_portal_items($portal, 'postgres')->{3}{lab_result}, 'a row fixed by the EHR flows again');

# ---------------------------------------------------------------- capture_disabled
is(one(q{SELECT cardinality(capture_disabled) FROM portal_sync.status}), '0', 'no table with capture disabled');
one(q{ALTER TABLE ehr.allergy DISABLE TRIGGER ALL});
is(one(q{SELECT array_to_string(capture_disabled, ',') FROM portal_sync.status}), 'ehr.allergy',
	'status.capture_disabled names a table whose triggers are disabled');
like(one(q{SELECT detail FROM portal_sync.explain('1') WHERE step = 'capture'}), qr/ehr\.allergy/,
	'explain names it too');
one(q{ALTER TABLE ehr.allergy ENABLE TRIGGER ALL});
is(one(q{SELECT cardinality(capture_disabled) FROM portal_sync.status}), '0', 'enabled again');

ps_check_settled($node, $db, $portal, 'at the end');

$node->stop;
$portal->stop;
done_testing();
