
# Copyright (c) 2026, portal_sync developers
#
# Units bounded by bytes (SPEC 5: rows read in pieces of about
# max_batch_bytes): one statement inserting many large documents of one
# patient makes one outbox entry with many keys, which is sent a few keys
# at a time.
#
# 1. 60 documents of 256 kB for a ready patient, in one statement (with
#    max_batch_bytes 1MB): all delivered, in several units.
# 2. The same while the patient's snapshot waits for an open transaction:
#    the entry is held, and must not keep every later unit on itself
#    (another patient's change is delivered meanwhile; this looped on the
#    first version of the byte bound).
# 3. Small and large rows of one source in one entry: the data of the small
#    ones is read with their sizes, the large ones' by key once the unit is
#    cut; rows then change from small to large and back, in transactions
#    committed while delivery runs.  The portal must hold every row as it
#    is now.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('rows_by_bytes', $portal, conf => q{
portal_sync.max_batch_bytes = '1MB'
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 1) FROM generate_series(1, 6) i;
	  SELECT pstest.book(i) FROM generate_series(1, 4) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
is(one(q{SELECT portal_sync.wait_ready('1', '30s')}), 't', 'patient 1 ready');

# ---------------------------------------------------------------- 1
my $mark = ps_nreq($portal);
one(q{INSERT INTO ehr.ccda_document (patient_id, document)
	  SELECT 1, repeat(md5(g::text), 8192) FROM generate_series(1, 60) g});
ok(ps_wait_drained($node, $db, 120), '60 documents of 256 kB in one statement: drained');
my $docs = ps_portal_items($portal, 'postgres')->{1}{ccda} || {};
is(scalar keys %$docs, 60, 'all 60 documents are on the portal');
my @reqs = grep { ($_->{status} // '') =~ /^2/ } @{ $portal->requests(since => $mark) };
cmp_ok(scalar @reqs, '>=', 10, 'sent in pieces of about max_batch_bytes (' . scalar(@reqs) . ' requests)');
cmp_ok((sort { $b <=> $a } map { $_->{json_bytes} } @reqs)[0], '<', 2 * 1024 * 1024, 'no request of 2 MB or more');

# ---------------------------------------------------------------- 2
my $open = $node->background_psql($db);
$open->query_safe(q{BEGIN; UPDATE ehr.problem SET description = 'open' WHERE patient_id = 5});
one(q{SELECT pstest.book(5)});
one(q{INSERT INTO ehr.ccda_document (patient_id, document)
	  SELECT 5, repeat(md5(g::text), 8192) FROM generate_series(1, 12) g});
one(q{UPDATE ehr.medication SET dose = 'while 5 waits' WHERE patient_id = 2});
ok(ps_wait_until(sub {
			my $meds = ps_portal_items($portal, 'postgres')->{2}{medication} || {};
			grep { ($_->{dose} // '') eq 'while 5 waits' } values %$meds;
		}, 'patient 2 delivered', 30),
	'another patient\'s change is delivered while the held entry of large documents waits');
$open->query_safe(q{COMMIT});
$open->quit;
ok(ps_wait_drained($node, $db, 120), 'the transaction ended: drained');
$docs = ps_portal_items($portal, 'postgres')->{5}{ccda} || {};
is(scalar keys %$docs, 12, 'all 12 documents of patient 5 are on the portal');

# ---------------------------------------------------------------- 3
one(q{INSERT INTO ehr.problem (patient_id, description)
	  SELECT 3, CASE WHEN g % 25 = 0 THEN repeat(md5(g::text), 1600) ELSE 'small ' || g END
	  FROM generate_series(1, 300) g});
for my $round (1 .. 6)
{
	one(qq{UPDATE ehr.problem
		  SET description = CASE WHEN description LIKE 'small%'
								 THEN repeat(md5(problem_id::text || '$round'), 1600)
								 ELSE 'small again $round' END
		  WHERE patient_id = 3 AND problem_id % 7 = $round});
}
ok(ps_wait_drained($node, $db, 120), 'small and large rows changing size: drained');
my %portal_problems = map { $_->{problem_id} => $_->{description} }
  values %{ ps_portal_items($portal, 'postgres')->{3}{problem} || {} };
my %table_problems = map { split /\|/, $_, 2 }
  split /\n/, one(q{SELECT problem_id || '|' || description FROM ehr.problem WHERE patient_id = 3});
is(scalar keys %portal_problems, scalar keys %table_problems,
	'every problem of patient 3 is on the portal (' . scalar(keys %table_problems) . ')');
is(scalar(grep { ($portal_problems{$_} // '') ne $table_problems{$_} } keys %table_problems), 0,
	'each as it is now, small or large');

ps_check_settled($node, $db, $portal, 'at the end');

$node->stop;
$portal->stop;
done_testing();
