--
-- 08_upgrade: ALTER EXTENSION portal_sync UPDATE from 1.0 to 1.1 loses
-- nothing queued, and leaves the same objects as a fresh 1.1.  Before the
-- update, this library still captures into a 1.0 schema (the EHR's writes
-- never break between a package upgrade and the ALTER).
--
\set VERBOSITY default
\set SHOW_CONTEXT never

-- What a fresh 1.1 holds, to compare with the updated one.
SELECT md5(string_agg(d, E'\n' ORDER BY d)) AS fresh_objects FROM (
	SELECT pg_describe_object(classid, objid, objsubid) AS d
	FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
	  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'portal_sync')
	UNION ALL
	SELECT format('%s(%s) -> %s', p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid))
	FROM pg_proc p WHERE p.pronamespace = 'portal_sync'::regnamespace
	UNION ALL
	SELECT format('%s: %s', c.relname, pg_get_viewdef(c.oid))
	FROM pg_class c WHERE c.relnamespace = 'portal_sync'::regnamespace AND c.relkind = 'v'
	UNION ALL
	SELECT format('%s.%s %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod))
	FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
	WHERE c.relnamespace = 'portal_sync'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
	UNION ALL
	SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
	WHERE c.relnamespace = 'portal_sync'::regnamespace
	UNION ALL
	SELECT format('%s %s', conname, pg_get_constraintdef(oid)) FROM pg_constraint
	WHERE connamespace = 'portal_sync'::regnamespace) x \gset

CREATE DATABASE regress_portal_sync_upgrade;
\c regress_portal_sync_upgrade
CREATE EXTENSION portal_sync VERSION '1.0';
SELECT extversion FROM pg_extension WHERE extname = 'portal_sync';

CREATE TABLE appt (id int PRIMARY KEY, pid int NOT NULL);
CREATE INDEX ON appt (pid);
CREATE TABLE med (id int PRIMARY KEY, pid int NOT NULL, dose text);
CREATE INDEX ON med (pid);
SELECT portal_sync.attach('appt', 'appointment', 'pid');
SELECT portal_sync.attach('med', 'clinical', 'pid');
-- 1.0 keeps columns by number and rules as node trees: the update converts them
CREATE TABLE note (id int PRIMARY KEY, pid int NOT NULL, seen date, kind text,
				   final boolean NOT NULL DEFAULT false);
CREATE INDEX ON note (pid);
SELECT portal_sync.attach('note', 'note', 'pid', date_col => 'seen',
						  share_when => 'kind <> ''phone''',
						  enroll_when => 'final AND kind = ''encounter''');

-- 1.0 schema, this library: an enrollment as 1.0 made it, then changes.
INSERT INTO appt VALUES (1, 7);
INSERT INTO med VALUES (10, 7, 'a'), (11, 8, 'b');
UPDATE med SET dose = 'c' WHERE id = 10;
SELECT patient_id, op, keys FROM portal_sync.outbox ORDER BY seq;
SELECT patient_id, enrolled_by FROM portal_sync.enrollment ORDER BY 1;
CREATE TEMP TABLE before_update AS SELECT seq, patient_id, source_id, op, keys FROM portal_sync.outbox;

ALTER EXTENSION portal_sync UPDATE TO '1.1';
SELECT extversion FROM pg_extension WHERE extname = 'portal_sync';

-- Nothing queued before the update is lost or changed.
SELECT count(*) AS lost FROM before_update b
WHERE NOT EXISTS (SELECT 1 FROM portal_sync.outbox o
				  WHERE (o.seq, o.patient_id, o.source_id, o.op, o.keys)
						IS NOT DISTINCT FROM (b.seq, b.patient_id, b.source_id, b.op, b.keys));

-- Capture goes on, now with enrollment requests.
INSERT INTO appt VALUES (2, 9);
INSERT INTO med VALUES (12, 9, 'd'), (13, 7, 'e');
SELECT patient_id, op, keys FROM portal_sync.outbox WHERE seq > (SELECT max(seq) FROM before_update) ORDER BY seq;
SELECT patient_id, enrolled_by FROM portal_sync.patients ORDER BY 1;
SELECT pending_events, state IN ('unconfigured', 'not_running', 'idle') AS state_ok FROM portal_sync.status;

-- An attachment made under 1.0 is kept by name, its rules as SQL text ...
SELECT name, source, patient_col, key_col, date_col, share_when, enroll_when, columns
FROM portal_sync.sources ORDER BY name;
-- ... and keeps working: its enroll_when decides, a rename of a column it
-- reads is followed, a new attachment gets a source id of its own.
INSERT INTO note VALUES (1, 20, '2026-01-01', 'phone', true), (2, 21, '2026-01-01', 'encounter', true);
ALTER TABLE note RENAME COLUMN kind TO note_type;
SELECT share_when, enroll_when FROM portal_sync.sources WHERE name = 'note';
INSERT INTO note VALUES (3, 22, '2026-01-02', 'encounter', true), (4, 23, '2026-01-02', 'phone', true);
SELECT patient_id, enrolled_by FROM portal_sync.patients WHERE patient_id IN ('20', '21', '22', '23') ORDER BY 1;
CREATE TABLE vital (id int PRIMARY KEY, pid int NOT NULL);
CREATE INDEX ON vital (pid);
SELECT portal_sync.attach('vital', 'clinical', 'pid');
SELECT count(DISTINCT source_id) AS source_ids, count(*) AS sources FROM portal_sync.source;

-- The updated extension holds the same objects as a fresh 1.1.
SELECT md5(string_agg(d, E'\n' ORDER BY d)) = :'fresh_objects' AS same_as_fresh FROM (
	SELECT pg_describe_object(classid, objid, objsubid) AS d
	FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
	  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'portal_sync')
	UNION ALL
	SELECT format('%s(%s) -> %s', p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid))
	FROM pg_proc p WHERE p.pronamespace = 'portal_sync'::regnamespace
	UNION ALL
	SELECT format('%s: %s', c.relname, pg_get_viewdef(c.oid))
	FROM pg_class c WHERE c.relnamespace = 'portal_sync'::regnamespace AND c.relkind = 'v'
	UNION ALL
	SELECT format('%s.%s %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod))
	FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
	WHERE c.relnamespace = 'portal_sync'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
	UNION ALL
	SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
	WHERE c.relnamespace = 'portal_sync'::regnamespace
	UNION ALL
	SELECT format('%s %s', conname, pg_get_constraintdef(oid)) FROM pg_constraint
	WHERE connamespace = 'portal_sync'::regnamespace) x;

\c contrib_regression
DROP DATABASE regress_portal_sync_upgrade;
