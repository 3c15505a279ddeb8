
# Copyright (c) 2026, portal_sync developers
#
# Answers that must not lose events (SPEC 5 "Answers"), each while the EHR
# writes:
#
# - a 2xx whose "rejected" list is larger than a megabyte: read whole, and
#   exactly the events it names are dead-lettered;
# - a 2xx with an HTML body (a proxy's page): not accepted, retried;
# - 404, 405 and 410 for everything, and a redirect to another host: the
#   endpoint is misconfigured: backed off, reported, the redirect not
#   followed, nothing dead-lettered;
# - 400 for everything: splitting dead-letters a few events, then backs
#   off (the breaker) instead of dead-lettering the backlog.
#
# Each ends with the portal holding exactly the shareable state.

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
my $elsewhere = PortalSyncTest::Portal->start(host => '127.0.0.2');
my $node = ps_new_node('answers', $portal, conf => q{
portal_sync.batch_size = 20
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 30) i;
	  SELECT pstest.book(i) FROM generate_series(1, 20) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial state');

my $n = 0;
sub change
{
	$n++;
	one(qq{UPDATE ehr.medication SET dose = 'dose $n' WHERE patient_id <= 12;
		   UPDATE ehr.allergy SET reaction = 'reaction $n' WHERE patient_id <= 12;});
}
sub dead_letter_count { return scalar @{ ps_dead_letters($node, $db) } }

# ---------------------------------------------------------------- a large rejected list
{
	my $mark = ps_nreq($portal);
	# every medication event rejected, with a reason of 300 kB: a batch of
	# 20 events is answered with up to 6 MB
	$portal->modes({ mode => 'rejected_list', match => { source => 'medication' },
		reason_bytes => 300_000, count => 2 });
	change();
	ok(ps_wait_drained($node, $db), 'large rejected list: drained');
	my $reqs = $portal->requests(since => $mark);
	my @rejected = map { @{ $_->{rejected} } } grep { $_->{rule} eq 'rejected_list' } @$reqs;
	ok(@rejected > 0, scalar(@rejected) . ' events rejected in the large answers');
	my %dead = map { $_->{event_id} => 1 } @{ ps_dead_letters($node, $db) };
	is_deeply([ sort keys %dead ], [ sort @rejected ],
		'large rejected list: exactly the rejected events are dead-lettered');
	$portal->mode({ mode => 'ok' });
	one('SELECT portal_sync.retry_dead_letters()');
	ps_check_settled($node, $db, $portal, 'large rejected list, retried', since => $mark, resends => 1);
}

# ---------------------------------------------------------------- HTML 200
{
	my $mark = ps_nreq($portal);
	$portal->modes({ mode => 'status', status => 200, count => 3,
		raw_body => '<html><body>Welcome to the hotel network</body></html>' });
	change();
	ok(ps_wait_until(sub { (ps_status($node, $db)->{last_error} // '') =~ /not a JSON object/ },
		'HTML reported', 30), 'a 2xx with an HTML body is reported as not accepted');
	ps_check_settled($node, $db, $portal, 'a 2xx with an HTML body', since => $mark, resends => 1);
	my $html = grep { $_->{rule} eq 'status' } @{ $portal->requests(since => $mark) };
	is($html, 3, 'three HTML answers were given');
}

# ---------------------------------------------------------------- misconfigured endpoint
for my $case ([ 404, 30 ], [ 405, 5 ], [ 410, 5 ])
{
	my ($status, $seconds) = @$case;
	my $mark = ps_nreq($portal);
	$portal->modes({ mode => 'status', status => $status, body => { error => 'no such route' } });
	change();
	# from the first such answer on (before it, the worker may not have
	# seen the change yet)
	ps_wait_until(sub { grep { ($_->{status} // '') eq $status } @{ $portal->requests(since => $mark) } },
		"a first HTTP $status", 30);
	my $until = time() + $seconds;
	my $dead = 0;
	my $idle = 0;
	my $reported = 0;
	my %other_errors;
	while (time() < $until)
	{
		my $st = ps_status($node, $db);
		$dead = 1 if dead_letter_count() > 0;
		$idle = 1 if $st->{state} eq 'idle';
		if (($st->{last_error} // '') =~ /misconfigured.*HTTP $status/) { $reported = 1 }
		else { $other_errors{ $st->{last_error} // 'NULL' }++ }
		sleep(0.5);
	}
	my $s = ps_status($node, $db);
	ok(!$dead, "HTTP $status for ${seconds}s: nothing dead-lettered");
	ok(!$idle, "HTTP $status: status never says idle");
	ok($s->{pending_events} > 0, "HTTP $status: events still pending");
	ok($reported, "HTTP $status: reported as a misconfigured endpoint");
	note("HTTP $status: other last_error seen meanwhile: $_") for sort keys %other_errors;
	cmp_ok(scalar(@{ $portal->requests(since => $mark) }), '<', 4 * $seconds,
		"HTTP $status: retried with backoff");
	$portal->mode({ mode => 'ok' });
	ps_check_settled($node, $db, $portal, "after HTTP $status", since => $mark);
}

# ---------------------------------------------------------------- redirect
{
	my $mark = ps_nreq($portal);
	my $target = $elsewhere->url . '/events';
	$portal->modes({ mode => 'status', status => 302, headers => { Location => $target }, body => {} });
	change();
	ok(ps_wait_until(sub { (ps_status($node, $db)->{last_error} // '') =~ /HTTP 302.*redirects are not followed/ },
		'redirect reported', 30), 'a redirect is reported as a misconfigured endpoint');
	sleep(3);
	is(scalar @{ $elsewhere->requests }, 0, 'the redirect was not followed: the other host got nothing');
	is(dead_letter_count(), 0, 'redirect: nothing dead-lettered');
	$portal->mode({ mode => 'ok' });
	ps_check_settled($node, $db, $portal, 'after a redirect', since => $mark);
}

# ---------------------------------------------------------------- 400 for everything
{
	my $mark = ps_nreq($portal);
	my $phase_start = one(q{SELECT now()});
	$portal->modes({ mode => 'status', status => 400, body => { error => 'bad request' } });
	change();
	my $events = 0;
	ok(ps_wait_until(sub { (ps_status($node, $db)->{last_error} // '') =~ /refused 3 events in a row/ },
		'breaker', 60), '400 for everything: the worker backs off instead of dead-lettering on');
	# Each trip of the breaker backs off (a failure), and an accepted
	# request (one answered before the portal turned to 400) starts the
	# count again: at most 3 events are dead-lettered per trip or accepted
	# request, however late this look comes.
	my $s = ps_status($node, $db);
	my $accepted = one(qq{SELECT count(*) FROM portal_sync.delivery_log
		WHERE sent_at >= '$phase_start' AND accepted_at IS NOT NULL});
	cmp_ok($s->{dead_letters}, '<=', 3 * ($s->{consecutive_failures} + $accepted),
		"at most 3 events dead-lettered per trip of the breaker ($s->{dead_letters} in $s->{consecutive_failures} trips, $accepted accepted)");
	ok(ps_status($node, $db)->{pending_events} > 10, 'the rest of the backlog is still pending');
	$portal->mode({ mode => 'ok' });
	ok(ps_wait_drained($node, $db), '400 over: drained');
	one('SELECT portal_sync.retry_dead_letters()');
	ps_check_settled($node, $db, $portal, 'after 400 for everything', since => $mark, resends => 1);
}

$node->stop;
$portal->stop;
$elsewhere->stop;
done_testing();
