
# Copyright (c) 2026, portal_sync developers
#
# Defect (issue 11, #8): settings a DBA gives the EHR's database apply to
# the worker too.  With ALTER DATABASE … SET default_transaction_read_only
# = on (a database being migrated, say), statement_timeout = '1ms',
# lock_timeout, idle_in_transaction_session_timeout and a repeatable-read
# default, the worker must still deliver, without restarting: it sets what
# it needs for itself.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('database_settings', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

# The test's sessions (the EHR's, psql) override the database's settings
# with their connection options; the worker has no such options.
$ENV{PGOPTIONS} = '-c default_transaction_read_only=off -c statement_timeout=0'
  . ' -c lock_timeout=0 -c idle_in_transaction_session_timeout=0';

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 3) i;
	  SELECT pstest.book(i) FROM generate_series(1, 2) i;});
ok(ps_wait_drained($node, $db, 60), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial state');

one(q{ALTER DATABASE postgres SET default_transaction_read_only = on;
	  ALTER DATABASE postgres SET statement_timeout = '1ms';
	  ALTER DATABASE postgres SET lock_timeout = '1ms';
	  ALTER DATABASE postgres SET idle_in_transaction_session_timeout = '1ms';
	  ALTER DATABASE postgres SET default_transaction_isolation = 'repeatable read';});

# A new worker process, started with the database's settings.
my $old_pid = ps_worker_pid($node, $db);
one(qq{SELECT pg_terminate_backend($old_pid)});
my $pid;
ok(ps_wait_until(sub { $pid = ps_worker_pid($node, $db); $pid && $pid != $old_pid },
		'a new worker', 60),
	'the worker is started again');

# A change of an enrolled patient and a new enrollment, both delivered.
one(q{UPDATE ehr.medication SET dose = 'under database settings' WHERE patient_id = 1;
			 SELECT pstest.book(3);});
ok(ps_wait_until(sub {
			my $meds = ps_portal_items($portal, $db)->{1}{medication} || {};
			grep { $_->{dose} eq 'under database settings' } values %$meds;
		}, 'change delivered', 60),
	'a change is delivered under the database settings');
ok(ps_wait_until(sub { one(q{SELECT portal_sync.is_ready('3')}) =~ /t$/ },
		'enrollment delivered', 60),
	'a new enrollment is delivered under the database settings');
ok(ps_wait_until(sub { one(q{SELECT pending_events FROM portal_sync.status}) =~ /(^|\n)0$/ },
		'drained', 60),
	'everything is delivered');
is(ps_worker_pid($node, $db), $pid, 'the worker did not restart meanwhile');
my $status = ps_sql_row($node, $db, q{SELECT state, last_error FROM portal_sync.status});
is($status->{state}, 'idle', 'status: idle');

one(q{ALTER DATABASE postgres RESET ALL});
ps_compare_state($node, $db, $portal, 'at the end');
ps_check_portal_invariants($portal, 'at the end');
$node->stop;
$portal->stop;
done_testing();
