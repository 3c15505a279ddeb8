
# Copyright (c) 2026, portal_sync developers
#
# Each failure answer of SPEC 5, with nothing lost and nothing dead-lettered
# that should not be: 5xx, 408/425, 429 with Retry-After, 401/403 (reported
# as an authentication failure), 400 for one event (only it dead-lettered),
# a 2xx with a rejected list, a hang past http_timeout, a dropped
# connection, connection refused, 413 (split), random failures; the bearer
# token and auth_token_file; retry_dead_letters().

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use POSIX ();
use Time::HiRes qw(time);

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('failures', $portal);
my $db = 'postgres';

sub one { return $node->safe_psql($db, $_[0]) }
sub nreq { return scalar @{ $portal->requests } }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 10) i;
	  SELECT pstest.book(i) FROM generate_series(1, 8) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial');

my $n = 0;
# A change touching several patients.
sub change
{
	$n++;
	one(qq{BEGIN;
		   UPDATE ehr.medication SET dose = 'dose $n' WHERE patient_id IN (1, 2, 3);
		   INSERT INTO ehr.problem (patient_id, description) VALUES (4, 'problem $n');
		   UPDATE ehr.insurance SET plan_name = 'plan $n' WHERE patient_id = 9;
		   COMMIT;});
}

# Dead letters a scenario meant to produce (event_id => 1); any other is
# a dead letter that should not be.
my %meant;

sub new_dead_letters
{
	return [ grep { !$meant{ $_->{event_id} } } @{ ps_dead_letters($node, $db) } ];
}

sub no_dead_letters
{
	my ($name) = @_;
	my $dl = new_dead_letters();
	is(scalar @$dl, 0, "$name: nothing dead-lettered")
	  or diag(explain $dl);
}

# ---------------------------------------------------------------- 5xx, then ok
for my $status (500, 502, 503, 504, 408, 425)
{
	my $mark = nreq();
	$portal->mode({ mode => 'status', status => $status, count => 2 });
	change();
	ok(ps_wait_drained($node, $db), "$status x2: drained");
	my $reqs = $portal->requests(since => $mark);
	my @st = map { $_->{status} } @$reqs;
	is(join(',', @st[0 .. 2]), "$status,$status,200", "$status x2: retried until accepted")
	  or diag("statuses: @st");
	# The same events are retried.
	my %first = map { $_->{event_id} => 1 } @{ $reqs->[0]{events} };
	my %retry = map { $_->{event_id} => 1 } map { @{ $_->{events} } } @$reqs[1 .. $#$reqs];
	ok(!grep({ !$retry{$_} } keys %first), "$status: the refused events are sent again");
	no_dead_letters($status);
}
ps_compare_state($node, $db, $portal, 'after 5xx/408/425');

# Failing for a while: status shows backing off, consecutive failures, the
# error; nothing is lost.
my $mark500 = nreq();
$portal->mode({ mode => 'status', status => 500 });
change();
ok(ps_wait_until(sub {
			my $s = ps_status($node, $db);
			$s->{consecutive_failures} >= 3 && $s->{pending_events} > 0
		}, 'three consecutive failures', 60),
	'500 forever: consecutive failures counted, events pending');
my $s = ps_status($node, $db);
like($s->{last_error} // '', qr/500/, 'last_error names the HTTP status');
ok(defined $s->{last_error_at}, 'last_error_at set');
ok(defined $s->{next_attempt_at}, 'next_attempt_at set while backing off');
like($s->{state}, qr/^(backing_off|running)$/, "state while failing: $s->{state}");
my $explain = eval { ps_sql_json($node, $db, q{SELECT * FROM portal_sync.explain('1')}) } || [];
diag("explain failed: $@") if $@;
my @steps;
for (map { $_->{step} } @$explain) { push @steps, $_ unless @steps && $steps[-1] eq $_ }
is(join(',', @steps), 'enrolled,chart,snapshot,pending,dead_letters,withheld,capture,worker',
	'explain: one row per step, in order');
my ($wstep) = grep { $_->{step} eq 'worker' } @$explain;
ok($wstep && !$wstep->{ok} && ($wstep->{detail} // '') =~ /500/, 'explain: worker step shows the failure')
  or diag(explain $wstep);
my ($pstep) = grep { $_->{step} eq 'pending' } @$explain;
ok($pstep && !$pstep->{ok}, 'explain: pending step not ok while events wait') or diag(explain $pstep);
# Backoff: the gaps between attempts grow up to retry_max_delay (2s).
# An attempt sends the same events again: the gaps are from each request
# to the next one carrying its events (requests in flight beside it, for
# other patients, are not attempts of it).
my @failed = grep { $_->{status} eq '500' } @{ $portal->requests(since => $mark500) };
my @gaps = map { my $again = ps_resent_after(\@failed, $_); $again ? $again->{time} - $_->{time} : () } @failed;
ok(@gaps >= 2, 'several attempts');
cmp_ok((sort { $a <=> $b } @gaps)[0], '>', 0.05, 'attempts are spaced (no busy retry)');
cmp_ok((sort { $b <=> $a } @gaps)[0], '<', 3.5, 'backoff capped by retry_max_delay')
  or diag("gaps: @gaps");
$portal->mode({ mode => 'ok' });
ok(ps_wait_drained($node, $db), 'portal back: drained');
$s = ps_status($node, $db);
is($s->{consecutive_failures}, 0, 'consecutive_failures reset after success');
no_dead_letters('500 forever');
ps_compare_state($node, $db, $portal, 'after an outage of 500s');

# ---------------------------------------------------------------- 429 + Retry-After
# Retry-After is honoured up to retry_max_delay (10 s here).
ps_set_conf($node, 'portal_sync.retry_max_delay' => '10s');
{
	my $mark = nreq();
	$portal->mode({ mode => 'status', status => 429, retry_after => '4', count => 1 });
	change();
	ok(ps_wait_drained($node, $db), '429: drained');
	my $reqs = $portal->requests(since => $mark);
	my ($refused) = grep { $_->{status} eq '429' } @$reqs;
	ok($refused, '429 answered');
	my $next = $refused && ps_resent_after($reqs, $refused);
	my $gap = $next ? $next->{time} - $refused->{answered_at} : 0;
	cmp_ok($gap, '>=', 3.5, "Retry-After: 4 honoured (next attempt after ${gap}s)");
	no_dead_letters('429');
}
# Retry-After as an HTTP-date, on a 503.
{
	my $mark = nreq();
	my @t = gmtime(time() + 5);
	my $date = POSIX::strftime('%a, %d %b %Y %H:%M:%S GMT', @t);
	$portal->mode({ mode => 'status', status => 503, retry_after => $date, count => 1 });
	change();
	ok(ps_wait_drained($node, $db), '503 with an HTTP-date Retry-After: drained');
	my $reqs = $portal->requests(since => $mark);
	my ($refused) = grep { $_->{status} eq '503' } @$reqs;
	my $next = $refused && ps_resent_after($reqs, $refused);
	my $gap = $next ? $next->{time} - $refused->{answered_at} : 0;
	cmp_ok($gap, '>=', 3.0, "Retry-After HTTP-date honoured (next attempt after ${gap}s)");
	no_dead_letters('503 Retry-After date');
}
# A Retry-After of ten years, with retry_max_delay 3 s: the next attempt
# comes after about 3 s, not after a day or a reload.
ps_set_conf($node, 'portal_sync.retry_max_delay' => '3s');
for my $retry_after ('315360000', POSIX::strftime('%a, %d %b %Y %H:%M:%S GMT', gmtime(time() + 315360000)))
{
	my $mark = nreq();
	$portal->mode({ mode => 'status', status => 503, retry_after => $retry_after, count => 1 });
	change();
	ok(ps_wait_drained($node, $db, 30), "Retry-After '$retry_after' above retry_max_delay: drained");
	my $reqs = $portal->requests(since => $mark);
	my ($refused) = grep { $_->{status} eq '503' } @$reqs;
	my $next = $refused && ps_resent_after($reqs, $refused);
	my $gap = $next ? $next->{time} - $refused->{answered_at} : 0;
	cmp_ok($gap, '<', 6, "Retry-After '$retry_after' is cut to retry_max_delay (next attempt after ${gap}s)");
	cmp_ok($gap, '>=', 2.5, "... and honoured up to it");
	no_dead_letters('Retry-After above retry_max_delay');
}
ps_set_conf($node, 'portal_sync.retry_max_delay' => '2s');

# ---------------------------------------------------------------- 401 / 403
for my $status (401, 403)
{
	$portal->mode({ mode => 'status', status => $status });
	change();
	ok(ps_wait_until(sub { ps_status($node, $db)->{consecutive_failures} >= 2 }, "$status failures", 60),
		"$status: retried");
	my $s = ps_status($node, $db);
	like($s->{last_error} // '', qr/auth/i, "$status: reported as an authentication failure")
	  or diag("last_error: " . ($s->{last_error} // 'NULL'));
	ok($s->{pending_events} > 0, "$status: events still pending");
	no_dead_letters($status);
	$portal->mode({ mode => 'ok' });
	ok(ps_wait_drained($node, $db), "$status then ok: drained");
}
ps_compare_state($node, $db, $portal, 'after 401/403');

# ---------------------------------------------------------------- token
ps_set_conf($node, 'portal_sync.auth_token' => 's3cret-token');
$portal->mode({ mode => 'require_token', token => 's3cret-token' });
{
	my $mark = nreq();
	change();
	ok(ps_wait_drained($node, $db), 'token: drained');
	my $reqs = $portal->requests(since => $mark);
	ok(@$reqs && !grep({ ($_->{headers}{Authorization} // '') ne 'Bearer s3cret-token' } @$reqs),
		'Authorization: Bearer <token> on every request');
	# PostgreSQL itself logs 'parameter "portal_sync.auth_token" changed to
	# "..."' at reload; every other line must not carry the token.
	my @lines = grep { /s3cret-token/ && !/parameter "portal_sync\.auth_token" changed to/ }
	  split /\n/, slurp_file($node->logfile);
	ok(!@lines, 'token never in a log line of portal_sync') or diag(join("\n", @lines));
}
my $tokfile = $node->basedir . '/portal.token';
PostgreSQL::Test::Utils::append_to_file($tokfile, "from-file-token\n");
ps_set_conf($node, 'portal_sync.auth_token_file' => $tokfile);
$portal->mode({ mode => 'require_token', token => 'from-file-token' });
change();
ok(ps_wait_drained($node, $db), 'auth_token_file wins over auth_token');
# Wrong token: 401 from the portal's point of view.
ps_set_conf($node, 'portal_sync.auth_token_file' => undef, 'portal_sync.auth_token' => 'wrong');
change();
ok(ps_wait_until(sub { (ps_status($node, $db)->{last_error} // '') =~ /auth/i }, 'auth failure with wrong token', 60),
	'wrong token: authentication failure reported');
no_dead_letters('wrong token');
$portal->mode({ mode => 'require_token', token => 's3cret-token' });
ps_set_conf($node, 'portal_sync.auth_token' => 's3cret-token');
ok(ps_wait_drained($node, $db), 'token fixed by reload: drained');
ps_set_conf($node, 'portal_sync.auth_token' => undef);
$portal->mode({ mode => 'ok' });

# ---------------------------------------------------------------- 400 for one event
# The portal refuses (400) any batch holding the event of the medication
# named 'poison pill'; other events of the same patient, before and after
# it, must get through.
$portal->mode({ mode => 'reject_event', match => { source => 'medication', 'data.drug_name' => 'poison pill' }, status => 400 });
my ($bad_med) = one(q{BEGIN;
	INSERT INTO ehr.medication (patient_id, drug_name) SELECT p, 'fine ' || i FROM generate_series(1, 3) p, generate_series(1, 4) i;
	INSERT INTO ehr.medication (patient_id, drug_name) VALUES (2, 'poison pill') RETURNING med_id;
	COMMIT;});
one(q{INSERT INTO ehr.allergy (patient_id, allergen) VALUES (2, 'after the bad one')});
ok(ps_wait_drained($node, $db), '400 for one event: drained');
my $dl = new_dead_letters();
is(scalar @$dl, 1, '400: exactly one event dead-lettered') or diag(explain $dl);
is($dl->[0]{source} // '', 'medication', '400: the rejected event');
is($dl->[0]{key} // '', $bad_med, '400: the rejected row');
is($dl->[0]{patient_id} // '', '2', '400: its patient');
is($dl->[0]{http_status} // '', 400, '400: its http_status');
$meant{ $_->{event_id} } = 1 for @$dl;
is(ps_status($node, $db)->{dead_letters}, scalar(keys %meant), 'status counts the dead letter');
ps_compare_state($node, $db, $portal, '400: everything else delivered',
	exclude => [ [ 2, 'medication', $bad_med ] ]);
my $pt2 = ps_sql_row($node, $db, q{SELECT * FROM portal_sync.patients WHERE patient_id = '2'});
is($pt2->{dead_letters}, 1, 'patients view counts it');
# Retry after the portal is fixed.
$portal->mode({ mode => 'ok' });
is(ps_query($node, $db, q{SELECT portal_sync.retry_dead_letters()}), '1', 'retry_dead_letters requeues one');
ok(ps_wait_drained($node, $db), 'retried dead letter: drained');
is(scalar @{ ps_dead_letters($node, $db) }, 0, 'no dead letter left');
ps_compare_state($node, $db, $portal, 'after retry_dead_letters');
%meant = map { $_->{event_id} => 1 } @{ ps_dead_letters($node, $db) };

# Other 4xx (422), the rejected event in the middle of a patient's changes.
$portal->mode({ mode => 'reject_event', match => { 'data.description' => 'unprocessable' }, status => 422 });
my ($bad_prob) = one(q{BEGIN;
	UPDATE ehr.problem SET status = 'active' WHERE patient_id IN (1, 3, 5);
	INSERT INTO ehr.problem (patient_id, description) VALUES (3, 'unprocessable') RETURNING problem_id;
	COMMIT;});
one(q{UPDATE ehr.allergy SET severity = 'mild' WHERE patient_id = 3});
ok(ps_wait_drained($node, $db), '422: drained');
$dl = new_dead_letters();
is(join(',', map { "$_->{source}/$_->{key}/$_->{http_status}" } @$dl), "problem/$bad_prob/422",
	'422: only the rejected event dead-lettered');
$meant{ $_->{event_id} } = 1 for @$dl;
ps_compare_state($node, $db, $portal, '422: everything else delivered',
	exclude => [ [ 3, 'problem', $bad_prob ] ]);
$portal->mode({ mode => 'ok' });
is(ps_query($node, $db, q{SELECT portal_sync.retry_dead_letters('3')}), '1', 'retry_dead_letters(patient)');
ok(ps_wait_drained($node, $db), '422 retried: drained');
%meant = map { $_->{event_id} => 1 } @{ ps_dead_letters($node, $db) };

# ---------------------------------------------------------------- rejected list
$portal->mode({ mode => 'rejected_list', match => { 'data.allergen' => 'reject me' }, reason => 'allergen code unknown' });
my ($rej_all) = one(q{BEGIN;
	UPDATE ehr.allergy SET reaction = 'hives ' || allergy_id WHERE patient_id IN (1, 2);
	INSERT INTO ehr.allergy (patient_id, allergen) VALUES (1, 'reject me') RETURNING allergy_id;
	COMMIT;});
one(q{UPDATE ehr.allergy SET severity = 'severe' WHERE patient_id = 1 AND allergen <> 'reject me'});
ok(ps_wait_drained($node, $db), 'rejected list: drained');
$dl = new_dead_letters();
is(join(',', map { "$_->{source}/$_->{key}" } @$dl), "allergy/$rej_all", 'rejected list: only that event dead-lettered');
like($dl->[0]{reason} // '', qr/allergen code unknown/, 'rejected list: the portal\'s reason kept');
$meant{ $_->{event_id} } = 1 for @$dl;
ps_compare_state($node, $db, $portal, 'rejected list',
	exclude => [ [ 1, 'allergy', $rej_all ] ]);
$portal->mode({ mode => 'ok' });
ps_query($node, $db, q{SELECT portal_sync.retry_dead_letters()});
ok(ps_wait_drained($node, $db), 'rejected list retried: drained');
ps_compare_state($node, $db, $portal, 'after rejected list retried');
%meant = map { $_->{event_id} => 1 } @{ ps_dead_letters($node, $db) };

# ---------------------------------------------------------------- hang past the timeout
for my $apply (0, 1)
{
	my $mark = nreq();
	$portal->mode({ mode => 'hang', seconds => 5, apply => $apply ? JSON::PP::true : JSON::PP::false, count => 1 });
	change();
	# While the portal holds the request, the worker has no transaction open.
	ps_wait_until(sub { scalar @{ $portal->requests(since => $mark) } }, 'request in flight', 20);
	my $wpid = ps_worker_pid($node, $db);
	my $xact = $node->safe_psql($db,
		"SELECT coalesce(state, '') || '|' || (xact_start IS NULL) || '|' || (backend_xid IS NULL) || '|' || (backend_xmin IS NULL)"
		  . " FROM pg_stat_activity WHERE pid = $wpid");
	like($xact, qr/^[^|]*\|(t|true)\|(t|true)\|(t|true)$/, "hang (apply=$apply): no transaction (nor snapshot) open while the request is in flight")
	  or diag("worker: state|no xact_start|no xid|no xmin = $xact");
	ok(ps_wait_drained($node, $db), "hang (apply=$apply): drained");
	my $reqs = $portal->requests(since => $mark);
	# the hung request: still unanswered, or answered after the hang
	my ($hung) = grep { !defined $_->{answered_at} || $_->{answered_at} - $_->{time} > 1.5 } @$reqs;
	my $again = $hung && ps_resent_after($reqs, $hung);
	ok($again, "hang (apply=$apply): the hung batch was sent again");
	my $gap = $again ? $again->{time} - $hung->{time} : 0;
	cmp_ok($gap, '>=', 1.5, "hang (apply=$apply): gave up after http_timeout, not before (${gap}s)");
	cmp_ok($gap, '<', 4.9, "hang (apply=$apply): did not wait for the answer (${gap}s)");
	no_dead_letters("hang $apply");
	ps_compare_state($node, $db, $portal, "after hang (apply=$apply)");
}
ok(ps_wait_until(sub { $portal->state->{answers}{200} && 1 }, 'answers', 10), 'portal answering');

# ---------------------------------------------------------------- dropped connection
$portal->mode({ mode => 'close', count => 2 });
change();
ok(ps_wait_drained($node, $db), 'dropped connections: drained');
no_dead_letters('dropped connection');

# ---------------------------------------------------------------- connection refused
$portal->down;
change();
ok(ps_wait_until(sub {
			my $s = ps_status($node, $db);
			$s->{consecutive_failures} >= 2 && defined $s->{last_error}
		}, 'failures while the portal is down', 60),
	'connection refused: failures recorded');
my $st = ps_status($node, $db);
ok($st->{pending_events} > 0, 'connection refused: events pending');
ok(defined $st->{oldest_pending_age}, 'oldest_pending_age shown');
change();
$portal->up;
ok(ps_wait_drained($node, $db), 'portal back up: drained');
no_dead_letters('connection refused');
ps_compare_state($node, $db, $portal, 'after connection refused');

# ---------------------------------------------------------------- 413: split
{
	my $mark = nreq();
	# small enough that the batches of every lane are too large
	$portal->mode({ mode => 'max_body', bytes => 2000 });
	one(q{UPDATE ehr.medication SET frequency = 'TID' WHERE patient_id <= 8;
		  UPDATE ehr.allergy SET reaction = 'swelling' WHERE patient_id <= 8;});
	ok(ps_wait_drained($node, $db), '413: drained');
	my $reqs = $portal->requests(since => $mark);
	ok(grep({ $_->{status} eq '413' } @$reqs), '413 was answered');
	ok(!grep({ $_->{status} =~ /^2/ && $_->{json_bytes} > 2000 } @$reqs), '413: accepted batches fit');
	no_dead_letters('413');
	ps_compare_state($node, $db, $portal, 'after 413');
	$portal->mode({ mode => 'ok' });
}

# ---------------------------------------------------------------- max_batch_bytes / batch_size
{
	ps_set_conf($node, 'portal_sync.max_batch_bytes' => '64kB');
	my $mark = nreq();
	one(q{INSERT INTO ehr.visit_note (patient_id, provider, note_type, visit_date, finalized, body)
		  SELECT 1, 'Dr. Long', 'encounter', '2024-08-01', true, repeat('long note ', 1500) FROM generate_series(1, 8);
		  INSERT INTO ehr.visit_note (patient_id, provider, note_type, visit_date, finalized, body)
		  VALUES (2, 'Dr. Longer', 'encounter', '2024-08-02', true, repeat('longer note ', 8000));});
	ok(ps_wait_drained($node, $db), 'max_batch_bytes 64kB: drained');
	my $reqs = $portal->requests(since => $mark);
	my @big = grep { $_->{json_bytes} > 65536 && @{ $_->{events} } > 1 } @$reqs;
	ok(!@big, 'no batch of several events above max_batch_bytes')
	  or diag(join(' ', map { "$_->{json_bytes}B/" . scalar(@{ $_->{events} }) . 'ev' } @big));
	ok(grep({ $_->{json_bytes} > 65536 && @{ $_->{events} } == 1 && $_->{status} =~ /^2/ } @$reqs),
		'a larger single event is sent alone');
	ps_compare_state($node, $db, $portal, 'max_batch_bytes');
	no_dead_letters('max_batch_bytes');
	ps_set_conf($node, 'portal_sync.max_batch_bytes' => undef);
}
{
	ps_set_conf($node, 'portal_sync.batch_size' => '7');
	my $mark = nreq();
	one(q{UPDATE ehr.immunization SET site = 'left thigh' WHERE patient_id <= 8});
	ok(ps_wait_drained($node, $db), 'batch_size 7: drained');
	my $reqs = $portal->requests(since => $mark);
	ok(!grep({ @{ $_->{events} } > 7 } @$reqs), 'no batch above batch_size');
	ps_set_conf($node, 'portal_sync.batch_size' => undef);
}

# ---------------------------------------------------------------- random failures
$portal->modes({ mode => 'delay', seconds => 0.02 },
	{ mode => 'random_fail', rate => 0.35, status => 503, seed => 11 });
ps_set_conf($node, 'portal_sync.batch_size' => '10');
one(q{SELECT pstest.make_patient(i, 3) FROM generate_series(11, 25) i;
	  SELECT pstest.book(i) FROM generate_series(11, 25) i;
	  UPDATE ehr.vital_sign SET pulse = pulse + 1;});
change();
ok(ps_wait_drained($node, $db, 240), 'random failures: drained');
$portal->mode({ mode => 'ok' });
ps_set_conf($node, 'portal_sync.batch_size' => undef);
no_dead_letters('random failures');
ps_compare_state($node, $db, $portal, 'after random failures');

ps_check_portal_invariants($portal, 'failures');
ps_check_event_ids_stable($portal->requests, 'failures');
ps_check_send_order($portal->requests, 'failures');
ps_check_ccda_after_snapshot($portal->requests, 'failures');
my $log = ps_sql_json($node, $db, q{SELECT * FROM portal_sync.delivery_log ORDER BY sent_at});
ok(scalar @$log, 'delivery_log has rows');
ok(grep({ ($_->{http_status} // 0) == 500 } @$log), 'delivery_log records failed attempts');

$node->stop;
$portal->stop;
done_testing();
