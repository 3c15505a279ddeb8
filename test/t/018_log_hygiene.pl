
# Copyright (c) 2026, portal_sync developers
#
# SPEC 6: no log line or error message carries clinical content or the
# token.  A full run with verbose server logging (log_min_messages =
# debug1; log_statement = none, so that the test's own SQL is not logged
# by PostgreSQL core) through every failure path: 500s, 401, 400 for one
# event (dead letter), a rejected list, timeouts, dropped connections,
# connection refused, a share_when rule that fails on a row at send time
# (its error would quote the value), kill -9 of the worker; then the server
# log is searched for the token and for every marker value inserted.  The
# token comes from auth_token_file (PostgreSQL core logs a new value of
# portal_sync.auth_token itself at reload).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $token = 'TOKEN-zq81-Hush';
my $tokdir = PostgreSQL::Test::Utils::tempdir();
PostgreSQL::Test::Utils::append_to_file("$tokdir/token", "$token\n");
chmod 0600, "$tokdir/token";
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('log_hygiene', $portal, conf => qq{
log_statement = none
log_min_messages = debug1
log_min_error_statement = panic
log_error_verbosity = verbose
restart_after_crash = on
portal_sync.auth_token_file = '$tokdir/token'
portal_sync.batch_size = 5
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }
$portal->mode({ mode => 'require_token', token => $token });

# Marker values: each appears in clinical columns only.
my @markers = map { sprintf('ZQX%02dMARK', $_) } 1 .. 12;
one(q{SELECT pstest.make_patient(i, 1) FROM generate_series(1, 8) i; SELECT pstest.book(i) FROM generate_series(1, 6) i;});
one(qq{
UPDATE ehr.patient SET first_name = '$markers[0]', guardian_phone = '$markers[1]' WHERE patient_id = 1;
INSERT INTO ehr.medication (patient_id, drug_name, dose) VALUES (1, '$markers[2]', '$markers[3]');
INSERT INTO ehr.allergy (patient_id, allergen, reaction) VALUES (2, '$markers[4]', 'hives');
INSERT INTO ehr.problem (patient_id, description) VALUES (3, '$markers[5]');
INSERT INTO ehr.visit_note (patient_id, provider, note_type, visit_date, finalized, body) VALUES (4, 'Dr. Q', 'encounter', '2025-01-01', true, '$markers[6]');
INSERT INTO ehr.ccda_document (patient_id, document) VALUES (5, '<ClinicalDocument>$markers[7]</ClinicalDocument>');
INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (7, 'Payer', '$markers[8]');
});
ok(ps_wait_drained($node, $db), 'delivered with the token from the file');

# Failures of every kind, each with marker content in flight.
for my $m ({ mode => 'status', status => 500, count => 2 }, { mode => 'status', status => 401, count => 2 },
	{ mode => 'hang', seconds => 3, apply => JSON::PP::false, count => 1 }, { mode => 'close', count => 1 },
	{ mode => 'status', status => 413, count => 1 })
{
	$portal->modes($m, { mode => 'require_token', token => $token });
	one(qq{UPDATE ehr.medication SET dose = '$markers[3]' || ' $m->{mode}' WHERE patient_id = 1});
	ok(ps_wait_drained($node, $db, 60), "drained after $m->{mode} " . ($m->{status} // ''));
}
$portal->modes({ mode => 'reject_event', match => { 'data.allergen' => $markers[4] }, status => 400 },
	{ mode => 'rejected_list', match => { 'data.description' => $markers[5] }, reason => 'bad code' },
	{ mode => 'require_token', token => $token });
one(qq{UPDATE ehr.allergy SET reaction = 'worse' WHERE allergen = '$markers[4]';
	   UPDATE ehr.problem SET status = 'inactive' WHERE description = '$markers[5]';});
ok(ps_wait_drained($node, $db, 60), 'drained with dead letters');
ok(ps_status($node, $db)->{dead_letters} >= 2, 'dead letters made');
$portal->modes({ mode => 'require_token', token => $token });

# Connection refused.
$portal->down;
one(qq{UPDATE ehr.problem SET icd10 = '$markers[9]' WHERE patient_id = 3});
ps_wait_until(sub { ps_status($node, $db)->{consecutive_failures} >= 2 }, 'failures', 30);
$portal->up;
ok(ps_wait_drained($node, $db, 60), 'drained after connection refused');

# A share_when that fails on a row at send time: the cast error would quote
# the value; the row is withheld and counted, the message never kept.
my ($ret, $out, $err) = $node->psql($db, q{SELECT portal_sync.attach('ehr.immunization', 'clinical', 'patient_id',
	date_col => 'administered_on', privacy_col => 'privacy_level', share_when => 'lot_number::int > 0')});
is($ret, 0, 'a rule with a cast is accepted') or diag($err);
one(qq{UPDATE ehr.immunization SET lot_number = '$markers[10]' WHERE patient_id = 1;
	INSERT INTO ehr.immunization (patient_id, vaccine, administered_on, lot_number) VALUES (1, 'MMR', '2025-01-01', '$markers[10]')});
ok(ps_wait_until(sub { ps_status($node, $db)->{rule_errors} >= 1 }, 'rule failure counted', 30),
	'a failing rule is counted in status.rule_errors (the row is withheld)');
is(one(q{SELECT string_agg(sqlstate, ',') FROM portal_sync.rule_error}), '22P02',
	'portal_sync.rule_error holds the SQLSTATE only');
my $st = ps_status($node, $db);
unlike($st->{last_error} // '', qr/$markers[10]/, 'status.last_error does not quote the row');
# explain() of the patient: works, and quotes no row value (not even in an
# error).
my ($eret, $explain, $eerr) = $node->psql($db, q{SELECT string_agg(step || ': ' || coalesce(detail, ''), E'\n') FROM portal_sync.explain('1')});
is($eret, 0, 'explain() works while a rule fails on one of the patient\'s rows') or diag($eerr);
unlike("$explain $eerr", qr/ZQX\d\dMARK/, 'explain() (or its error) does not quote clinical values');
one(q{UPDATE ehr.immunization SET lot_number = '12' WHERE lot_number !~ '^[0-9]+$'});
ok(ps_wait_drained($node, $db, 60), 'drained once the row is fixed');

# kill -9 of the worker mid-flight.
$portal->modes({ mode => 'hang', seconds => 2, count => 1 }, { mode => 'require_token', token => $token });
one(qq{UPDATE ehr.visit_note SET body = '$markers[11]' WHERE patient_id = 4});
ps_wait_until(sub { ps_worker_pid($node, $db) }, 'worker', 10);
sleep(1);
ps_kill_worker($node, $db);
ok(ps_wait_drained($node, $db, 90), 'drained after kill -9');

# Error messages a DBA can provoke that carry a row must not either.
# (enroll() of an id that is not a patient id quotes what the DBA typed:
# that is no row's content.)
($ret, $out, $err) = $node->psql($db, qq{SELECT portal_sync.enroll('ZQX99TYPED')});
note("enroll of an id that is not a patient id: $ret $err");

$node->stop;
my $log = slurp_file($node->logfile);
ok(length($log) > 10000, 'the server log is verbose (' . length($log) . ' bytes)');
my @tok = grep { /\Q$token\E/ } split /\n/, $log;
ok(!@tok, 'the token is in no log line') or diag(join("\n", @tok[0 .. ($#tok > 5 ? 5 : $#tok)]));
my @clin = grep { /ZQX(0[1-9]|1\d)MARK/ } split /\n/, $log;
ok(!@clin, 'no clinical value in any log line') or diag(join("\n", @clin[0 .. ($#clin > 10 ? 10 : $#clin)]));

$portal->stop;
done_testing();
