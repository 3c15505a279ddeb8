
# Copyright (c) 2026, portal_sync developers
#
# Compressed bodies (portal_sync.compression, default gzip): every request
# is gzip with chunked transfer encoding and the portal (which decodes and
# checks it) holds exactly what the database shares; a portal that answers
# 415 to gzip gets the same batch again, same batch_id, uncompressed, with
# nothing dead-lettered, and the reason in status.last_error, until the
# next reload; with compression off, bodies are plain JSON and a 415
# means a misconfigured endpoint (retried, nothing dead-lettered).
# Writers keep writing while the portal refuses.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('compression', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

is(one('SHOW portal_sync.compression'), 'gzip', 'compression is gzip by default');

# 1. gzip: what the portal holds is what the database shares
my $mark = ps_nreq($portal);
one(q{SELECT pstest.make_patient(i, 3) FROM generate_series(1, 30) i;
	  SELECT pstest.book(i) FROM generate_series(1, 30) i;});
ps_check_settled($node, $db, $portal, 'gzip');
my $reqs = $portal->requests(since => $mark);
ok(@$reqs > 0, 'gzip: requests were sent');
is(scalar(grep { ($_->{encoding} // '') ne 'gzip' } @$reqs), 0, 'gzip: every body is gzip-compressed');
is(scalar(grep { ($_->{headers}{'Transfer-Encoding'} // '') ne 'chunked' } @$reqs), 0,
	'gzip: every body is sent chunked');
my ($wire, $json) = (0, 0);
$wire += $_->{bytes} for @$reqs;
$json += $_->{json_bytes} for @$reqs;
cmp_ok($wire * 4, '<', $json, "gzip: bytes on the wire ($wire) well under the JSON ($json)");
diag(sprintf('gzip: %d bytes of JSON sent as %d (%.1fx)', $json, $wire, $json / ($wire || 1)));

# 2. a portal that refuses gzip: 415, then the same batch uncompressed
$mark = ps_nreq($portal);
$portal->modes({ mode => 'refuse_gzip' });
one(q{UPDATE ehr.medication SET dose = dose || ' (415)' WHERE patient_id BETWEEN 1 AND 10});
# a writer keeps writing while the worker finds out
my $writer = $node->background_psql($db);
$writer->query_safe(q{UPDATE ehr.medication SET dose = dose || ' more' WHERE patient_id BETWEEN 11 AND 20});
ps_check_settled($node, $db, $portal, 'after 415', since => $mark);
$reqs = $portal->requests(since => $mark);
# the requests in flight when the portal first answered 415 (at most
# max_inflight, each for other patients) are all refused; each goes again
my @refused = grep { $_->{status} eq '415' } @$reqs;
my $inflight = one('SHOW portal_sync.max_inflight');
ok(@refused >= 1 && @refused <= $inflight, '415: only the requests of one round refused (' . scalar(@refused) . ')');
is(scalar(grep { ($_->{encoding} // '') ne 'gzip' } @refused), 0, '415: every refused request was gzip');
my $last_refused = (sort { $b->{n} <=> $a->{n} } @refused)[0] // { n => -1 };
my @after = grep { $_->{n} > $last_refused->{n} } @$reqs;
my %sent_again = map { $_->{batch_id} => 1 } grep { !$_->{encoding} } @after;
is(scalar(grep { !$sent_again{ $_->{batch_id} } } @refused), 0,
	'415: each refused batch is sent again, same batch_id, uncompressed');
is(scalar(grep { $_->{encoding} } @after), 0, '415: nothing compressed after it');
like(ps_status($node, $db)->{last_error} // '', qr/415.*uncompressed/, '415: status.last_error says why');

# 3. a reload gives gzip another chance
$mark = ps_nreq($portal);
$portal->modes({ mode => 'ok' });
one('SELECT pg_reload_conf()');
$writer->query_safe(q{UPDATE ehr.medication SET dose = dose || ' reload' WHERE patient_id BETWEEN 1 AND 5});
ps_check_settled($node, $db, $portal, 'after reload', since => $mark);
$reqs = $portal->requests(since => $mark);
ok(@$reqs && !grep({ ($_->{encoding} // '') ne 'gzip' } @$reqs), 'after reload: bodies are gzip again');

# 4. compression off: plain JSON with its length; a 415 dead-letters nothing
$mark = ps_nreq($portal);
ps_set_conf($node, 'portal_sync.compression' => 'off');
$portal->modes({ mode => 'status', status => 415, count => 2 }, { mode => 'ok' });
$writer->query_safe(q{UPDATE ehr.medication SET dose = dose || ' plain' WHERE patient_id BETWEEN 6 AND 15});
ps_check_settled($node, $db, $portal, 'compression off', since => $mark);
$reqs = $portal->requests(since => $mark);
ok(@$reqs >= 3, 'off: the batch was retried after two 415 answers');
is(scalar(grep { $_->{encoding} } @$reqs), 0, 'off: no body is compressed');
is(scalar(grep { !defined $_->{headers}{'Content-Length'} || $_->{headers}{'Content-Length'} != $_->{bytes} } @$reqs),
	0, 'off: every body is sent with its length');

$writer->quit;
$node->stop;
$portal->stop;
done_testing();
