--
-- 07_operations: what a DBA operates portal_sync with (SPEC 6): the status
-- view, resync_patient, resync_all, retry_dead_letters, is_ready,
-- wait_ready, explain, the patients and dead_letters views.  This instance
-- has no portal_sync.endpoint, so the worker runs and delivers nothing.
--
\set VERBOSITY default
\set SHOW_CONTEXT never

-- The worker of this database starts by itself and says it has no
-- endpoint; events keep queueing.
DO $$
BEGIN
	FOR i IN 1..300 LOOP
		EXIT WHEN (SELECT state FROM portal_sync.status) = 'unconfigured';
		PERFORM pg_sleep(0.1);
	END LOOP;
END
$$;
SELECT worker_pid IS NOT NULL AS worker_runs, state, last_error,
	   pending_events > 0 AS events_queued, consecutive_failures, next_attempt_at
FROM portal_sync.status;
SELECT backend_type FROM pg_stat_activity
WHERE backend_type LIKE 'portal_sync%' AND (datname = current_database() OR datname IS NULL)
ORDER BY 1;

-- status counts what the tables hold.
SELECT (SELECT pending_events FROM portal_sync.status) =
	   (SELECT sum(CASE WHEN op = 's' THEN 1 ELSE cardinality(keys) END) FROM portal_sync.outbox)
	   AS pending_matches,
	   (SELECT enrolled_patients FROM portal_sync.status) =
	   (SELECT count(*) FROM portal_sync.patients) AS enrolled_matches,
	   (SELECT skipped_rows FROM portal_sync.status) =
	   (SELECT sum(row_count) FROM portal_sync.skipped_row) AS skipped_matches;

-- resync_patient: a snapshot request with a new seq; refused for a
-- patient who is not enrolled.
SELECT * FROM regress_util.new_events();
SELECT portal_sync.resync_patient('1') > 0 AS queued;
SELECT * FROM regress_util.new_events();
-- its value is the request's place in the queue
SELECT portal_sync.resync_patient('1') AS resync_seq \gset
SELECT :resync_seq = (SELECT max(seq) FROM portal_sync.outbox WHERE patient_id = '1' AND op = 's')
	   AS seq_returned;
SELECT portal_sync.resync_patient('999');
\echo :SQLSTATE

-- resync_all: every enrolled patient goes to the resync queue, which the
-- worker moves to the outbox at resync_rate per second.
-- (the worker settles enrollment requests even without an endpoint)
DO $$
BEGIN
	FOR i IN 1..300 LOOP
		EXIT WHEN (SELECT count(*) FROM portal_sync.enrollment) = (SELECT count(*) FROM portal_sync.patients);
		PERFORM pg_sleep(0.1);
	END LOOP;
END
$$;
SELECT (SELECT count(*) FROM portal_sync.enrollment) = (SELECT count(*) FROM portal_sync.patients) AS settled;
SELECT portal_sync.resync_all() = (SELECT count(*) FROM portal_sync.enrollment) AS all_queued;
SELECT (SELECT count(*) FROM portal_sync.resync_queue) = (SELECT count(*) FROM portal_sync.enrollment)
	   AS queue_holds_all;
SELECT pending_snapshots >= (SELECT count(*) FROM portal_sync.resync_queue) AS counted_as_pending
FROM portal_sync.status;
-- twice is the same as once
SELECT portal_sync.resync_all() = (SELECT count(*) FROM portal_sync.resync_queue) AS idempotent;

-- is_ready / wait_ready: nothing is accepted without a portal.
SELECT portal_sync.is_ready('1'), portal_sync.is_ready('999');
SELECT portal_sync.wait_ready('1', '200 ms');
SELECT portal_sync.wait_ready('1', '-1 s');
\echo :SQLSTATE

-- retry_dead_letters: a rejected item is queued again as a change (sent
-- as it is then); a rejected snapshot marker asks for a new snapshot.
INSERT INTO portal_sync.dead_letter (event_id, seq, patient_id, source_id, source, key, op, http_status, reason)
SELECT 'x-1', 1, '1', source_id, 'medication', '101', 'upsert', 400, 'bad dose'
FROM portal_sync.source WHERE name = 'medication';
INSERT INTO portal_sync.dead_letter (event_id, seq, patient_id, source_id, source, key, op, http_status, reason)
VALUES ('x-2', 2, '2', NULL, NULL, NULL, 'snapshot_end', 422, 'unknown patient');
SELECT event_id, patient_id, source, key, op, http_status, reason FROM portal_sync.dead_letters ORDER BY event_id;
SELECT dead_letters FROM portal_sync.status;
SELECT patient_id, dead_letters FROM portal_sync.patients WHERE dead_letters > 0 ORDER BY 1;
DELETE FROM portal_sync.resync_queue;
SELECT * FROM regress_util.new_events();
SELECT portal_sync.retry_dead_letters('1');
SELECT * FROM regress_util.new_events();
SELECT patient_id FROM portal_sync.resync_queue;
SELECT portal_sync.retry_dead_letters();
SELECT patient_id FROM portal_sync.resync_queue;
SELECT count(*) AS dead_left FROM portal_sync.dead_letters;

-- patients: one row per enrolled patient.
SELECT patient_id, enrolled_by, snapshot_requested_at IS NOT NULL AS requested,
	   snapshot_accepted_at, ready, pending_events > 0 AS has_pending, dead_letters
FROM portal_sync.patients WHERE patient_id IN ('1', '2') ORDER BY patient_id;

-- explain: one row per step, in order.
SELECT step, ok,
	   CASE WHEN step = 'pending' THEN regexp_replace(detail, 'captured .* ago', 'captured <age> ago')
			ELSE regexp_replace(detail, '(at|since) (Mon|Tue|Wed|Thu|Fri|Sat|Sun) [^)]*', '\1 <time>', 'g') END AS detail
FROM portal_sync.explain('1') WHERE step <> 'withheld' OR NOT ok;
SELECT step, ok, left(detail, 40) AS detail FROM portal_sync.explain('59') WHERE step IN ('enrolled', 'snapshot');

-- A chart above max_privacy_level is restricted; an item above it is
-- withheld by privacy, one before the cutoff by date.
UPDATE ehr.patient SET privacy_level = 3 WHERE patient_id = 1;
UPDATE portal_sync.settings SET date_cutoff = '2026-01-15';
SELECT step, ok, detail FROM portal_sync.explain('1') WHERE step IN ('chart') OR (step = 'withheld' AND NOT ok);
UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 1;
UPDATE portal_sync.settings SET date_cutoff = NULL;

-- Capture that cannot fire: a disabled capture trigger, a trigger set to
-- fire on replicas only; status and explain name the tables.
SELECT capture_disabled FROM portal_sync.status;
ALTER TABLE ehr.allergy DISABLE TRIGGER portal_sync_capture_update;
ALTER TABLE ehr.patient ENABLE REPLICA TRIGGER portal_sync_capture_insert;
SELECT capture_disabled FROM portal_sync.status;
SELECT step, ok, left(detail, 60) AS detail FROM portal_sync.explain('1') WHERE step = 'capture';
ALTER TABLE ehr.allergy ENABLE TRIGGER portal_sync_capture_update;
ALTER TABLE ehr.patient ENABLE TRIGGER portal_sync_capture_insert;
SELECT capture_disabled FROM portal_sync.status;

-- None of it is for PUBLIC.
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_can_execute
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'portal_sync'
  AND p.proname IN ('resync_patient', 'resync_all', 'retry_dead_letters', 'is_ready', 'wait_ready', 'explain',
					'unenroll', 'capture_disabled_tables')
ORDER BY 1;
SELECT c.relname, has_table_privilege('public', c.oid, 'SELECT') AS public_can_select
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'portal_sync' AND c.relname IN ('status', 'patients', 'dead_letters', 'delivery_log')
ORDER BY 1;
