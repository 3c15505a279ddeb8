
# Copyright (c) 2026, portal_sync developers
#
# Defect: a request whose answer was lost (the portal applied it after the
# worker's http_timeout) was followed by a batch built again from rows that
# had changed meanwhile: new content, new event_ids, higher seqs.  The
# portal then applied the late copy after that newer batch: the patient's
# seqs went backwards, and a portal that keeps the latest event_id it got
# for an item kept the older content in place of the newer one.
# SPEC v2 section 5: a later event of a patient is never sent while an
# earlier one is unanswered; a portal that dedupes by event_id can never
# keep an older content in place of a newer one.
#
# Each round: the portal holds the next request past http_timeout and
# applies it then; meanwhile a writer changes the rows that request
# carried (and others), again and again.  At the end the portal holds
# every row's latest content, and no patient's seqs went backwards.

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
my $node = ps_new_node('late_copy', $portal, conf => q{
portal_sync.http_timeout = '1s'
portal_sync.retry_max_delay = '500ms'
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 3) FROM generate_series(1, 6) i;
	  SELECT pstest.book(i) FROM generate_series(1, 6) i;});
ps_check_settled($node, $db, $portal, 'before');

for my $round (1 .. 4)
{
	my $since = scalar @{ $portal->requests };
	$portal->modes({ mode => 'hang', seconds => 2.5, apply => JSON::PP::true, count => 1 },
		{ mode => 'ok' });
	one(qq{UPDATE ehr.medication SET dose = 'round $round first' WHERE patient_id <= 3});
	ok(ps_wait_until(sub { @{ $portal->requests } > $since }, 'the request is held', 30),
		"round $round: the first request is held by the portal");
	# While it is held, and after the worker gave up on it, the same rows
	# change again (every 100 ms, until the late copy was applied).
	my $deadline = time() + 3.5;
	my $i = 0;
	while (time() < $deadline)
	{
		$i++;
		one(qq{UPDATE ehr.medication SET dose = 'round $round change $i' WHERE patient_id <= 3;
			   UPDATE ehr.allergy SET reaction = 'round $round change $i' WHERE patient_id <= 3});
		sleep 0.1;
	}
	ps_check_settled($node, $db, $portal, "round $round: a late copy after $i changes",
		resends => 1);
}

$node->stop;
$portal->stop;
done_testing();
