--
-- 02_attach: attach() / detach() / the sources view (SPEC 3).
--
\set VERBOSITY default
\set SHOW_CONTEXT never

-- The reference schema, attached the way a practice would.
\i test/attach_reference.sql

SELECT name, source, kind, patient_col, key_col, date_col, privacy_col,
	   share_when, enroll_when, attached_at IS NOT NULL AS has_attached_at
FROM portal_sync.sources ORDER BY name;

-- Four statement-level AFTER triggers with transition tables per table.
SELECT tgrelid::regclass AS tbl, count(*) AS triggers,
	   bool_and(tgtype & 1 = 0) AS all_statement_level,
	   bool_and(tgtype & 2 = 0) AS all_after,
	   bool_and(tgenabled = 'O') AS all_enabled,
	   bool_and(tgfoid = 'portal_sync.capture()'::regprocedure) AS all_capture
FROM pg_trigger
WHERE tgrelid IN (SELECT relid FROM portal_sync.source)
GROUP BY tgrelid ORDER BY tgrelid::regclass::text;
SELECT tgname, pg_get_triggerdef(oid) AS definition
FROM pg_trigger WHERE tgrelid = 'ehr.medication'::regclass AND NOT tgisinternal ORDER BY tgname;

--
-- Validation: every error has a clear message and a SQLSTATE, and nothing
-- is attached by a failed call.
--
CREATE SCHEMA scratch;
CREATE TABLE scratch.t (
	id			int PRIMARY KEY,
	pid			int,
	d			date,
	ts			timestamp,
	tstz		timestamptz,
	dtext		text,
	dint		int,
	priv		int,
	priv_small	smallint,
	priv_big	bigint,
	priv_text	text,
	priv_num	numeric,
	flag		boolean,
	code		text,
	uniq_col	int UNIQUE,
	nonuniq		int,
	partial_u	int,
	expr_u		text,
	comp_a		int,
	comp_b		int
);
CREATE INDEX t_pid_idx ON scratch.t (pid);
CREATE UNIQUE INDEX t_partial_u ON scratch.t (partial_u) WHERE partial_u > 0;
CREATE UNIQUE INDEX t_expr_u ON scratch.t (lower(expr_u));
CREATE UNIQUE INDEX t_comp ON scratch.t (comp_a, comp_b);
CREATE FUNCTION scratch.is_ok(int) RETURNS boolean
	LANGUAGE sql IMMUTABLE AS 'SELECT $1 > 0';
CREATE FUNCTION scratch.eq3(int, int) RETURNS boolean
	LANGUAGE sql IMMUTABLE AS 'SELECT $1 = $2';
CREATE OPERATOR scratch.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = scratch.eq3);

-- the source itself
SELECT portal_sync.attach(NULL, 'clinical', 'pid');
\echo :SQLSTATE
-- kind
SELECT portal_sync.attach('scratch.t', 'lab', 'pid');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', NULL, 'pid');
\echo :SQLSTATE
-- missing columns
SELECT portal_sync.attach('scratch.t', 'clinical', 'patient_id');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', NULL);
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', key_col => 'nope');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', date_col => 'nope');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', privacy_col => 'nope');
\echo :SQLSTATE
-- a dropped column is a missing column
ALTER TABLE scratch.t ADD COLUMN gone int;
ALTER TABLE scratch.t DROP COLUMN gone;
SELECT portal_sync.attach('scratch.t', 'clinical', 'gone');
\echo :SQLSTATE
-- system columns are not columns of the row
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', key_col => 'ctid');
\echo :SQLSTATE
-- key without a single-column unique index
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', key_col => 'nonuniq');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', key_col => 'partial_u');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', key_col => 'expr_u');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', key_col => 'comp_a');
\echo :SQLSTATE
CREATE TABLE scratch.nopk (id int, pid int);
CREATE INDEX ON scratch.nopk (pid);
SELECT portal_sync.attach('scratch.nopk', 'clinical', 'pid');
\echo :SQLSTATE
CREATE TABLE scratch.cpk (a int, b int, pid int, PRIMARY KEY (a, b));
CREATE INDEX ON scratch.cpk (pid);
SELECT portal_sync.attach('scratch.cpk', 'clinical', 'pid');
\echo :SQLSTATE
-- privacy_col must be an integer column
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', privacy_col => 'priv_text');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', privacy_col => 'priv_num');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', privacy_col => 'flag');
\echo :SQLSTATE
-- date_col must be a date or a timestamp
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', date_col => 'dtext');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', date_col => 'dint');
\echo :SQLSTATE
-- share_when: must parse, be boolean, use only the row's own columns and
-- built-in non-volatile functions, no subquery, never run a statement
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'flag AND');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => '');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'true; DROP TABLE scratch.t');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'true) OR (false');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'priv + 1');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'code');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'no_such_col > 0');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'EXISTS (SELECT 1 FROM ehr.patient)');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'pid IN (SELECT patient_id FROM ehr.patient)');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => '(SELECT true)');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'random() < 0.5');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'nextval(''portal_sync.outbox_seq'') > 0');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'pg_sleep(1) IS NULL');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'row_to_json(t) IS NOT NULL');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'scratch.is_ok(pid)');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'pid OPERATOR(scratch.===) 1');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'ehr.patient.privacy_level = 0');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'patient.privacy_level = 0');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'count(*) > 0');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'row_number() OVER () = 1');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'generate_series(1, 2) = 1');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => '$1');
\echo :SQLSTATE
-- built-in functions that run a query or read another table
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'query_to_xml(''SELECT 1 FROM ehr.patient'', true, false, '''') IS NOT NULL');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'pg_read_file(''/etc/hostname'') IS NOT NULL');
\echo :SQLSTATE
\set VERBOSITY sqlstate
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'table_to_xml(''ehr.patient'', true, false, '''') IS NOT NULL');
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'length(schema_to_xml(''ehr'', true, false, '''')::text) > 0');
-- a user-defined function hidden in a domain's CHECK constraint
CREATE DOMAIN scratch.ok_int AS int CHECK (scratch.is_ok(VALUE));
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'pid::scratch.ok_int > 0');
\set VERBOSITY default
-- enroll_when: the same checks
SELECT portal_sync.attach('scratch.t', 'appointment', 'pid', enroll_when => 'flag AND');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'appointment', 'pid', enroll_when => 'code');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'appointment', 'pid', enroll_when => 'random() < 0.5');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'appointment', 'pid', enroll_when => 'EXISTS (SELECT 1 FROM ehr.patient)');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'appointment', 'pid', enroll_when => 'scratch.is_ok(pid)');
\echo :SQLSTATE
-- enroll_when is for appointment, ccda, note and pin only
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', enroll_when => 'flag');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'insurance', 'pid', enroll_when => 'flag');
\echo :SQLSTATE
-- a name already used by another source
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', name => 'medication');
\echo :SQLSTATE
CREATE TABLE scratch.medication (med_id int PRIMARY KEY, patient_id int);
CREATE INDEX ON scratch.medication (patient_id);
SELECT portal_sync.attach('scratch.medication', 'clinical', 'patient_id');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', name => '');
\echo :SQLSTATE
-- a second chart (patient) source
\set VERBOSITY sqlstate
SELECT portal_sync.attach('scratch.t', 'patient', 'pid');
\set VERBOSITY default
-- things that are not plain tables
CREATE TABLE scratch.part (id int PRIMARY KEY, pid int, d date) PARTITION BY RANGE (id);
CREATE TABLE scratch.part_1 PARTITION OF scratch.part FOR VALUES FROM (1) TO (1000);
CREATE TABLE scratch.part_2 PARTITION OF scratch.part FOR VALUES FROM (1000) TO (2000);
CREATE INDEX ON scratch.part (pid);
-- a partition is refused: attach its partitioned table
SELECT portal_sync.attach('scratch.part_1', 'clinical', 'pid');
\echo :SQLSTATE
CREATE VIEW scratch.v AS SELECT * FROM scratch.t;
SELECT portal_sync.attach('scratch.v', 'clinical', 'pid', key_col => 'id');
\echo :SQLSTATE
CREATE MATERIALIZED VIEW scratch.mv AS SELECT * FROM scratch.t;
CREATE UNIQUE INDEX ON scratch.mv (id);
SELECT portal_sync.attach('scratch.mv', 'clinical', 'pid', key_col => 'id');
\echo :SQLSTATE
CREATE SEQUENCE scratch.s;
SELECT portal_sync.attach('scratch.s', 'clinical', 'last_value');
\echo :SQLSTATE
CREATE TEMP TABLE tmp_t (id int PRIMARY KEY, pid int);
SELECT portal_sync.attach('tmp_t', 'clinical', 'pid');
\echo :SQLSTATE
-- portal_sync's own tables
SELECT portal_sync.attach('portal_sync.outbox', 'clinical', 'patient_id', key_col => 'seq');
\echo :SQLSTATE

-- None of the failed calls attached anything or left a trigger.
SELECT count(*) AS sources FROM portal_sync.sources;
SELECT tgrelid::regclass, tgname FROM pg_trigger
WHERE tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'scratch'::regnamespace)
   OR tgrelid = 'portal_sync.outbox'::regclass
ORDER BY 1, 2;

--
-- Accepted: smallint/bigint privacy, date/timestamp/timestamptz dates, a
-- key with a UNIQUE constraint, stable built-in functions.
--
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', key_col => 'uniq_col',
						  date_col => 'tstz', privacy_col => 'priv_small',
						  share_when => 'flag AND code ~ ''^A'' AND d > current_date - 365',
						  name => 'scratch_t');
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', date_col => 'ts', privacy_col => 'priv_big',
						  name => 'scratch_t');
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', date_col => 'd', privacy_col => 'priv',
						  share_when => 'coalesce(flag, false) AND pid = ANY (ARRAY[1, 2, 3])',
						  name => 'scratch_t');
SELECT name, source, kind, patient_col, key_col, date_col, privacy_col, share_when, enroll_when
FROM portal_sync.sources WHERE name = 'scratch_t';

-- A partitioned table is attached as a whole: it and every partition get
-- the capture triggers (a statement fires those of the table it names).
SELECT portal_sync.attach('scratch.part', 'insurance', 'pid', date_col => 'd');
SELECT name FROM portal_sync.sources WHERE name = 'part';
SELECT tgrelid::regclass, count(*) FROM pg_trigger
WHERE tgname LIKE 'portal\_sync\_capture\_%' AND tgrelid::regclass::text LIKE 'scratch.part%'
GROUP BY 1 ORDER BY 1;
SELECT portal_sync.detach('scratch.part');
SELECT count(*) FROM pg_trigger
WHERE tgname LIKE 'portal\_sync\_capture\_%' AND tgrelid::regclass::text LIKE 'scratch.part%';
-- Its unique indexes must hold the partition key: a key unique only with
-- it is accepted with a notice (its values must not repeat across
-- partitions); a key without such an index is refused.
CREATE TABLE scratch.dated (id bigint, pid int, taken_on date, note text,
							PRIMARY KEY (id, taken_on)) PARTITION BY RANGE (taken_on);
CREATE TABLE scratch.dated_2025 PARTITION OF scratch.dated
	FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE INDEX ON scratch.dated (pid);
SELECT portal_sync.attach('scratch.dated', 'clinical', 'pid');
SELECT portal_sync.attach('scratch.dated', 'clinical', 'pid', key_col => 'note');
\echo :SQLSTATE
SELECT portal_sync.detach('scratch.dated');

-- A warning when the patient column has no index (leading column of one).
CREATE TABLE scratch.noidx (id int PRIMARY KEY, pid int, other int);
CREATE INDEX ON scratch.noidx (other, pid);
SELECT portal_sync.attach('scratch.noidx', 'insurance', 'pid');
CREATE INDEX ON scratch.noidx (pid);
SELECT portal_sync.attach('scratch.noidx', 'insurance', 'pid');

-- A failed re-attach keeps the settings it had.
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', share_when => 'random() < 0.5', name => 'scratch_t');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.t', 'clinical', 'pid', name => 'insurance');
\echo :SQLSTATE
SELECT name, kind, key_col, date_col, privacy_col, share_when FROM portal_sync.sources WHERE source = 'scratch.t'::regclass;

-- Re-attaching replaces the settings (kind, columns, rules, name) and keeps
-- exactly one set of triggers.
SELECT portal_sync.attach('scratch.t', 'note', 'pid', date_col => 'd',
						  share_when => 'flag', enroll_when => 'code = ''ENC''',
						  name => 'scratch_notes');
SELECT name, kind, key_col, date_col, privacy_col, share_when, enroll_when
FROM portal_sync.sources WHERE source = 'scratch.t'::regclass;
SELECT count(*) AS sources_named_scratch_t FROM portal_sync.sources WHERE name = 'scratch_t';
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'scratch.t'::regclass;
-- the old name is free again
SELECT portal_sync.attach('scratch.cpk', 'clinical', 'pid', key_col => 'a', name => 'scratch_t');
\echo :SQLSTATE
CREATE UNIQUE INDEX ON scratch.cpk (a);
SELECT portal_sync.attach('scratch.cpk', 'clinical', 'pid', key_col => 'a', name => 'scratch_t');
SELECT name, source, key_col FROM portal_sync.sources WHERE name = 'scratch_t';

-- The sources view shows current column names: renaming a column changes
-- nothing for portal_sync.
ALTER TABLE scratch.t RENAME COLUMN flag TO is_flag;
ALTER TABLE scratch.t RENAME COLUMN code TO note_code;
ALTER TABLE scratch.t RENAME COLUMN pid TO patient_ref;
SELECT name, patient_col, key_col, date_col, share_when, enroll_when
FROM portal_sync.sources WHERE source = 'scratch.t'::regclass;
-- Dropping or retyping a column portal_sync reads is refused while attached.
DROP MATERIALIZED VIEW scratch.mv;
DROP VIEW scratch.v;
ALTER TABLE scratch.t DROP COLUMN d;
\echo :SQLSTATE
ALTER TABLE scratch.t DROP COLUMN note_code;
\echo :SQLSTATE
ALTER TABLE scratch.t ALTER COLUMN patient_ref TYPE bigint;
\echo :SQLSTATE
ALTER TABLE scratch.t DROP COLUMN priv_text;

-- attach is transactional.
BEGIN;
SELECT portal_sync.attach('scratch.nopk', 'clinical', 'pid', key_col => 'id');
ROLLBACK;
BEGIN;
CREATE UNIQUE INDEX nopk_id ON scratch.nopk (id);
SELECT portal_sync.attach('scratch.nopk', 'clinical', 'pid', key_col => 'id');
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'scratch.nopk'::regclass;
ROLLBACK;
SELECT count(*) AS sources FROM portal_sync.sources WHERE source = 'scratch.nopk'::regclass;
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'scratch.nopk'::regclass;

--
-- columns: the minimum-necessary list of the columns sent in data.
--
CREATE TABLE scratch.visit (
	id			int PRIMARY KEY,
	pid			int,
	seen		date,
	amount		numeric,
	ssn			text,
	staff_comment text,
	last_viewed_at timestamptz,
	confidential boolean
);
CREATE INDEX ON scratch.visit (pid);
-- every entry must be a column of the row, given once, in a non-empty list
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid', columns => '{seen, nope}');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid', columns => '{seen, xmin}');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid', columns => '{seen, amount, seen}');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid', columns => '{}');
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid', columns => ARRAY['seen', NULL]::name[]);
\echo :SQLSTATE
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid', columns => '{{seen}, {amount}}');
\echo :SQLSTATE
ALTER TABLE scratch.visit ADD COLUMN gone int;
ALTER TABLE scratch.visit DROP COLUMN gone;
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid', columns => '{seen, gone}');
\echo :SQLSTATE
SELECT count(*) AS sources FROM portal_sync.sources WHERE source = 'scratch.visit'::regclass;
-- accepted; the sources view shows the list in the order given
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid', date_col => 'seen',
						  share_when => 'NOT coalesce(confidential, false)',
						  columns => '{amount, seen, id}');
SELECT name, date_col, share_when, columns FROM portal_sync.sources WHERE source = 'scratch.visit'::regclass;
-- Capture: an UPDATE that changes no column sent (amount, seen, id), nor
-- the patient, date or key, nor one a rule reads (confidential), queues
-- nothing; values are compared as stored (1.0 and 1.00 differ).
INSERT INTO scratch.visit VALUES (1, 41, '2026-02-01', 1.0, '123-45-6789', 'note', now(), false),
								 (2, 41, '2026-02-02', 2.0, '987-65-4321', NULL, NULL, NULL);
SELECT * FROM regress_util.new_events();
UPDATE scratch.visit SET last_viewed_at = now(), ssn = ssn || '', staff_comment = 'seen';
UPDATE scratch.visit SET amount = amount, seen = seen;
UPDATE scratch.visit SET confidential = confidential;
SELECT * FROM regress_util.new_events();
UPDATE scratch.visit SET amount = 1.00 WHERE id = 1;
SELECT * FROM regress_util.new_events();
UPDATE scratch.visit SET confidential = true WHERE id = 2;
SELECT * FROM regress_util.new_events();
UPDATE scratch.visit SET pid = 42, staff_comment = 'moved' WHERE id = 1;
SELECT * FROM regress_util.new_events();
-- renaming a listed column: the list follows it, like the other columns
ALTER TABLE scratch.visit RENAME COLUMN amount TO charge;
SELECT columns FROM portal_sync.sources WHERE source = 'scratch.visit'::regclass;
-- dropping a listed column is refused while attached, like the date column
ALTER TABLE scratch.visit DROP COLUMN charge;
\echo :SQLSTATE
ALTER TABLE scratch.visit DROP COLUMN staff_comment;
-- re-attaching replaces the list; NULL is every column again
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid', columns => '{seen}');
SELECT columns FROM portal_sync.sources WHERE source = 'scratch.visit'::regclass;
ALTER TABLE scratch.visit DROP COLUMN ssn;
SELECT portal_sync.attach('scratch.visit', 'insurance', 'pid');
SELECT columns IS NULL AS every_column FROM portal_sync.sources WHERE source = 'scratch.visit'::regclass;
-- with every column sent, SET x = x still queues nothing (also for rows
-- that still hold values of the dropped columns); any change does
UPDATE scratch.visit SET charge = charge, last_viewed_at = last_viewed_at;
SELECT * FROM regress_util.new_events();
UPDATE scratch.visit SET last_viewed_at = '2026-03-01' WHERE id = 2;
SELECT * FROM regress_util.new_events();
SELECT portal_sync.detach('scratch.visit');

--
-- detach
--
SELECT portal_sync.detach('scratch.cpk');
SELECT count(*) AS sources FROM portal_sync.sources WHERE source = 'scratch.cpk'::regclass;
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'scratch.cpk'::regclass;
-- not attached (any more)
SELECT portal_sync.detach('scratch.cpk');
\echo :SQLSTATE
SELECT portal_sync.detach('scratch.nopk');
\echo :SQLSTATE
-- after detach, writes are not captured
SELECT * FROM regress_util.new_events();
INSERT INTO scratch.cpk VALUES (1, 1, 1);
SELECT * FROM regress_util.new_events();
-- and it can be attached again
SELECT portal_sync.attach('scratch.cpk', 'insurance', 'pid', key_col => 'a');
INSERT INTO scratch.cpk VALUES (2, 1, 1);
SELECT * FROM regress_util.new_events();
SELECT portal_sync.detach('scratch.cpk');

-- Dropping an attached table leaves no source behind.
DROP TABLE scratch.noidx;
SELECT count(*) AS stale_sources FROM portal_sync.source s
WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = s.relid);

-- Clean up the scratch sources; only the reference schema stays attached.
SELECT portal_sync.detach('scratch.t');
SELECT name FROM portal_sync.sources ORDER BY name;
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.enrolled();
