
# Copyright (c) 2026, portal_sync developers
#
# Fault scenarios of SPEC 5, each ending in the full invariant check
# (ps_check_settled): 30% of requests answered 500 at random, 429 with
# Retry-After, answers slower than http_timeout (applied or not by the
# portal), connection refused, dropped connections, a slow and flaky portal
# under a larger workload.  Every scenario's changes are one transaction
# made before the first send, so each upsert received is checked against
# the database as it was at send time (nothing withheld ever received).

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
my $node = ps_new_node('fault_matrix', $portal, conf => q{
portal_sync.batch_size = 20
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 40) i;
	  SELECT pstest.book(i) FROM generate_series(1, 30) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial');

# One transaction of mixed changes: content, privacy raised and lowered,
# share_when flipped, dates across the cutoff, a restricted and a
# re-opened chart, inserts, deletes, a new enrollment.
my $n = 0;
sub churn
{
	$n++;
	my $p = 1 + $n % 30;
	one(qq{BEGIN;
		UPDATE ehr.medication SET dose = 'dose $n' WHERE patient_id <= 30;
		UPDATE ehr.medication SET privacy_level = CASE WHEN privacy_level = 0 THEN 2 ELSE 0 END WHERE patient_id IN ($p, $p + 1);
		UPDATE ehr.lab_result SET status = CASE WHEN status = 'final' THEN 'preliminary' ELSE 'final' END WHERE patient_id = $p + 2;
		UPDATE ehr.allergy SET recorded_at = CASE WHEN recorded_at < '2024-01-01' THEN date '2024-05-05' ELSE date '2019-05-05' END WHERE patient_id = $p + 3;
		UPDATE ehr.patient SET privacy_level = CASE WHEN privacy_level = 0 THEN 4 ELSE 0 END WHERE patient_id IN ($p + 4, 1 + ($n + 17) % 30);
		INSERT INTO ehr.problem (patient_id, description, privacy_level) SELECT i, 'problem $n', i % 2 FROM generate_series(1, 30, 3) i;
		DELETE FROM ehr.vital_sign WHERE vital_id IN (SELECT min(vital_id) FROM ehr.vital_sign WHERE patient_id IN ($p + 5, $p + 6) GROUP BY patient_id);
		INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (35 + $n % 5, 'Payer $n', 'P$n');
		COMMIT;});
	one(qq{SELECT pstest.book(30 + $n)}) if $n <= 10;
}
{
	one(q{UPDATE portal_sync.settings SET date_cutoff = '2020-01-01', max_privacy_level = 1;
		  SELECT portal_sync.resync_all();});
	ok(ps_wait_drained($node, $db), 'settings applied');
}

sub scenario
{
	my ($name, $modes, %opt) = @_;
	$portal->modes(@$modes);
	my $mark = ps_nreq($portal);
	churn();
	$opt{during}->($mark) if $opt{during};
	ps_check_settled($node, $db, $portal, $name, since => $mark, resends => $opt{resends},
		timeout => 180);
	$portal->mode({ mode => 'ok' });
	return $portal->requests(since => $mark);
}

# ---------------------------------------------------------------- 30% 500
my $reqs = scenario('30% answered 500', [ { mode => 'random_fail', rate => 0.3, status => 500, seed => 3 } ]);
my $n500 = grep { $_->{status} eq '500' } @$reqs;
ok($n500 > 0, "some requests answered 500 ($n500 of " . scalar(@$reqs) . ')');

# ---------------------------------------------------------------- 429 + Retry-After
$reqs = scenario('429 with Retry-After', [ { mode => 'status', status => 429, retry_after => '3', count => 2 } ]);
my @r429 = grep { $_->{status} eq '429' } @$reqs;
is(scalar @r429, 2, 'two 429 answers');
for my $r (@r429)
{
	# its next attempt: the next request with its events (others may be
	# in flight beside it, for other patients)
	my $next = ps_resent_after($reqs, $r);
	my $gap = $next ? $next->{time} - $r->{answered_at} : -1;
	# honoured up to retry_max_delay (2 s)
	cmp_ok($gap, '>=', 1.8, "Retry-After: 3 honoured up to retry_max_delay after request $r->{n} (next after ${gap}s)");
}

# ---------------------------------------------------------------- slower than the timeout
# The portal answers 200 after 3 s (http_timeout is 2 s) and applies the
# batch: the worker gave up, sends it again, the portal dedupes.
$reqs = scenario('answers slower than http_timeout, applied',
	[ { mode => 'delay', seconds => 3, count => 2 } ], resends => 1);
ok((grep { ($_->{answered_at} // 0) - $_->{time} >= 2.9 } @$reqs) >= 1, 'slow answers happened');
# Not applied: a gateway timing out.
$reqs = scenario('answers slower than http_timeout, not applied',
	[ { mode => 'hang', seconds => 3, apply => JSON::PP::false, count => 3 } ]);

# ---------------------------------------------------------------- connection refused
$reqs = scenario('connection refused for 8 s', [ { mode => 'ok' } ],
	during => sub { $portal->down; sleep(8); $portal->up; }, resends => 1);    # down() cuts requests in flight

# ---------------------------------------------------------------- dropped connections
$reqs = scenario('connections dropped without an answer',
	[ { mode => 'close', count => 4 } ], resends => 1);

# ---------------------------------------------------------------- slow and flaky, bigger
{
	my $mark = ps_nreq($portal);
	$portal->modes({ mode => 'delay', seconds => 0.05 },
		{ mode => 'random_fail', rate => 0.3, status => 503, seed => 17 },
		{ mode => 'close', count => 2 });
	one(q{BEGIN;
		SELECT pstest.make_patient(i, 4) FROM generate_series(41, 70) i;
		SELECT pstest.book(i) FROM generate_series(41, 70) i;
		UPDATE ehr.immunization SET site = 'right arm', privacy_level = imm_id % 3;
		UPDATE ehr.patient SET privacy_level = 2 WHERE patient_id % 10 = 3;
		COMMIT;});
	ps_check_settled($node, $db, $portal, 'slow and flaky portal, 30 new patients', since => $mark,
		resends => 1, timeout => 240);
	$portal->mode({ mode => 'ok' });
}

$node->stop;
$portal->stop;
done_testing();
