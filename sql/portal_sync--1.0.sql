/* portal_sync--1.0.sql */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION portal_sync" to load this file. \quit

-- The schema is created by CREATE EXTENSION (control file: schema = portal_sync).
REVOKE ALL ON SCHEMA portal_sync FROM PUBLIC;

/*
 * settings: the practice's sharing rules, one row, UPDATEd by the
 * administrator (System Preferences: Portal).
 */
CREATE TABLE portal_sync.settings (
	singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
	practice_id text NOT NULL DEFAULT pg_catalog.current_database()
		CHECK (practice_id <> ''),
	enabled boolean NOT NULL DEFAULT true,
	date_cutoff date NULL,
	max_privacy_level int NOT NULL DEFAULT 0
		CHECK (max_privacy_level BETWEEN 0 AND 4)
);
COMMENT ON TABLE portal_sync.settings IS
	'Sharing rules of the practice: one row, change it with UPDATE';
INSERT INTO portal_sync.settings DEFAULT VALUES;

CREATE FUNCTION portal_sync.settings_keep_row() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS
$$
BEGIN
	RAISE EXCEPTION 'portal_sync.settings must keep its one row'
		USING ERRCODE = 'restrict_violation',
			  HINT = 'Change the settings with UPDATE portal_sync.settings SET ...';
END
$$;
CREATE TRIGGER settings_keep_row BEFORE DELETE OR TRUNCATE ON portal_sync.settings
	FOR EACH STATEMENT EXECUTE FUNCTION portal_sync.settings_keep_row();
CREATE TRIGGER settings_one_row BEFORE INSERT ON portal_sync.settings
	FOR EACH STATEMENT EXECUTE FUNCTION portal_sync.settings_keep_row();

/*
 * source: one row per attached table.  Columns are kept by attribute number
 * and expressions as analyzed node trees, so that renaming a column of the
 * EHR's table changes nothing here; the sources view shows current names.
 */
CREATE TABLE portal_sync.source (
	source_id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	relid oid NOT NULL UNIQUE,
	kind text NOT NULL CHECK (kind IN ('appointment', 'ccda', 'note', 'pin',
									   'insurance', 'clinical', 'patient')),
	name text NOT NULL UNIQUE CHECK (name <> ''),
	patient_attnum int2 NOT NULL,
	key_attnum int2 NOT NULL,
	date_attnum int2,
	privacy_attnum int2,
	share_when_text text,
	share_when pg_node_tree,
	enroll_when_text text,
	enroll_when pg_node_tree,
	attached_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

/*
 * outbox: what changed, never the clinical content.  One row records that
 * the rows with the given keys of one source changed for one patient in one
 * statement (op 'i' insert, 'u' update, 'd' delete, 't' truncate), or that
 * a patient's whole record must be sent (op 's', snapshot request; source_id
 * and keys are NULL).  Delivery reads each row as it is at send time.
 * WAL-logged: nothing captured is lost on a crash.
 */
CREATE SEQUENCE portal_sync.outbox_seq;
CREATE TABLE portal_sync.outbox (
	seq bigint PRIMARY KEY,
	patient_id text COLLATE "C" NOT NULL,
	source_id int,
	op "char" NOT NULL CHECK (op IN ('i', 'u', 'd', 't', 's')),
	keys text[],
	captured_at timestamptz NOT NULL
);

/*
 * enrollment: patients whose data flows to the portal, with the initiating
 * event that started it.  Delivery state of the patient's snapshot lives
 * here too.
 */
CREATE TABLE portal_sync.enrollment (
	patient_id text COLLATE "C" PRIMARY KEY,
	enrolled_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	enrolled_by text NOT NULL,
	snapshot_seq bigint,
	snapshot_requested_at timestamptz,
	snapshot_accepted_at timestamptz
);

/*
 * skipped_row: rows of attached tables whose patient column was NULL, one
 * row per statement that had any.  Insert-only, so counting never makes two
 * EHR transactions wait for each other.
 */
CREATE TABLE portal_sync.skipped_row (
	source_id int NOT NULL,
	skipped_at timestamptz NOT NULL,
	row_count bigint NOT NULL
);

SELECT pg_catalog.pg_extension_config_dump('portal_sync.settings', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.source', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.outbox_seq', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.enrollment', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.skipped_row', '');

/* The C parts. */
CREATE FUNCTION portal_sync.capture() RETURNS trigger
	AS 'MODULE_PATHNAME', 'portal_sync_capture' LANGUAGE C;

CREATE FUNCTION portal_sync.attach(source regclass, kind text, patient_col name,
								   key_col name DEFAULT NULL,
								   date_col name DEFAULT NULL,
								   privacy_col name DEFAULT NULL,
								   share_when text DEFAULT NULL,
								   enroll_when text DEFAULT NULL,
								   name text DEFAULT NULL)
	RETURNS void
	AS 'MODULE_PATHNAME', 'portal_sync_attach' LANGUAGE C CALLED ON NULL INPUT;

CREATE FUNCTION portal_sync.detach(source regclass) RETURNS void
	AS 'MODULE_PATHNAME', 'portal_sync_detach' LANGUAGE C STRICT;

CREATE FUNCTION portal_sync.enroll(patient_id text) RETURNS boolean
	AS 'MODULE_PATHNAME', 'portal_sync_enroll' LANGUAGE C STRICT;

/* sources: the attached tables with their settings, by current names. */
CREATE VIEW portal_sync.sources AS
SELECT s.name,
	   s.relid::regclass AS source,
	   s.kind,
	   pa.attname AS patient_col,
	   ka.attname AS key_col,
	   da.attname AS date_col,
	   va.attname AS privacy_col,
	   pg_catalog.pg_get_expr(s.share_when, s.relid) AS share_when,
	   pg_catalog.pg_get_expr(s.enroll_when, s.relid) AS enroll_when,
	   s.attached_at
FROM portal_sync.source s
JOIN pg_catalog.pg_attribute pa ON pa.attrelid = s.relid AND pa.attnum = s.patient_attnum
JOIN pg_catalog.pg_attribute ka ON ka.attrelid = s.relid AND ka.attnum = s.key_attnum
LEFT JOIN pg_catalog.pg_attribute da ON da.attrelid = s.relid AND da.attnum = s.date_attnum
LEFT JOIN pg_catalog.pg_attribute va ON va.attrelid = s.relid AND va.attnum = s.privacy_attnum;

/* Nothing in the schema is for PUBLIC. */
REVOKE ALL ON ALL TABLES IN SCHEMA portal_sync FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA portal_sync FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA portal_sync FROM PUBLIC;
