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
INSERT INTO portal_sync.settings DEFAULT VALUES;	-- before its triggers exist

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

/*
 * An inserted row replaces the values of the one row instead of adding a
 * second: that is how pg_restore brings back the practice's settings.
 */
CREATE FUNCTION portal_sync.settings_merge_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS
$$
BEGIN
	UPDATE portal_sync.settings
	SET practice_id = NEW.practice_id, enabled = NEW.enabled,
		date_cutoff = NEW.date_cutoff, max_privacy_level = NEW.max_privacy_level;
	RETURN NULL;
END
$$;
CREATE TRIGGER settings_merge_insert BEFORE INSERT ON portal_sync.settings
	FOR EACH ROW EXECUTE FUNCTION portal_sync.settings_merge_insert();

/* Delivery resumes as soon as an UPDATE of the settings commits. */
CREATE FUNCTION portal_sync.settings_changed() RETURNS trigger
	AS 'MODULE_PATHNAME', 'portal_sync_settings_changed' LANGUAGE C;
CREATE TRIGGER settings_changed AFTER UPDATE ON portal_sync.settings
	FOR EACH STATEMENT EXECUTE FUNCTION portal_sync.settings_changed();

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
 * statement (op 'i' insert, 'u' update, 'd' delete), or that
 * a patient's whole record must be sent (op 's', snapshot request; source_id
 * and keys are NULL).  Delivery reads each row as it is at send time.
 * WAL-logged: nothing captured is lost on a crash.
 */
CREATE SEQUENCE portal_sync.outbox_seq;
CREATE TABLE portal_sync.outbox (
	seq bigint PRIMARY KEY,
	patient_id text COLLATE "C" NOT NULL,
	source_id int,
	op "char" NOT NULL CHECK (op IN ('i', 'u', 'd', 's')),
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
	snapshot_accepted_at timestamptz,
	purged boolean NOT NULL DEFAULT false,	/* chart restricted: portal purged */
	last_delivered_at timestamptz
);

/*
 * installation: identifies this database's stream, so that event ids of
 * two databases sending to one portal never collide.
 */
CREATE TABLE portal_sync.installation (
	singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
	install_id text NOT NULL DEFAULT pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '')
);
INSERT INTO portal_sync.installation DEFAULT VALUES;

/*
 * resync_queue: patients whose snapshot resync_all() asked for, moved to
 * the outbox by the worker at portal_sync.resync_rate per second.
 */
CREATE TABLE portal_sync.resync_queue (
	patient_id text COLLATE "C" PRIMARY KEY,
	requested_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

/* dead_letter: events the portal rejected, kept until retried. */
CREATE TABLE portal_sync.dead_letter (
	event_id text PRIMARY KEY,
	seq bigint NOT NULL,
	patient_id text COLLATE "C" NOT NULL,
	source_id int,
	source text,
	key text,
	op text NOT NULL,
	failed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	http_status int,
	reason text
);
CREATE INDEX ON portal_sync.dead_letter (patient_id);

/* delivery_log: one row per POST to the portal, kept log_retention. */
CREATE TABLE portal_sync.delivery_log (
	batch_id text NOT NULL,
	sent_at timestamptz NOT NULL,
	accepted_at timestamptz,
	http_status int,
	events int NOT NULL,
	patient_ids text[] NOT NULL
);
CREATE INDEX ON portal_sync.delivery_log (sent_at);

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
SELECT pg_catalog.pg_extension_config_dump('portal_sync.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.outbox_seq', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.enrollment', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.skipped_row', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.installation', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.resync_queue', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.delivery_log', '');

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

/* Operating it (admin.c) */
CREATE FUNCTION portal_sync.resync_patient(patient_id text) RETURNS bigint
	AS 'MODULE_PATHNAME', 'portal_sync_resync_patient' LANGUAGE C STRICT;

CREATE FUNCTION portal_sync.resync_all() RETURNS bigint
	AS 'MODULE_PATHNAME', 'portal_sync_resync_all' LANGUAGE C STRICT;

CREATE FUNCTION portal_sync.retry_dead_letters(patient_id text DEFAULT NULL) RETURNS bigint
	AS 'MODULE_PATHNAME', 'portal_sync_retry_dead_letters' LANGUAGE C CALLED ON NULL INPUT;

CREATE FUNCTION portal_sync.is_ready(patient_id text) RETURNS boolean
	AS 'MODULE_PATHNAME', 'portal_sync_is_ready' LANGUAGE C STRICT;

CREATE FUNCTION portal_sync.wait_ready(patient_id text, timeout interval DEFAULT '30s')
	RETURNS boolean
	AS 'MODULE_PATHNAME', 'portal_sync_wait_ready' LANGUAGE C STRICT;

/* Wakes the launcher so that it starts this database's worker. */
CREATE FUNCTION portal_sync.start_worker() RETURNS void
	AS 'MODULE_PATHNAME', 'portal_sync_start_worker' LANGUAGE C STRICT;

CREATE FUNCTION portal_sync.worker_status(OUT worker_pid int, OUT state text,
	OUT last_error text, OUT last_error_at timestamptz,
	OUT consecutive_failures int, OUT next_attempt_at timestamptz,
	OUT delivered_total bigint)
	RETURNS record
	AS 'MODULE_PATHNAME', 'portal_sync_worker_status' LANGUAGE C STRICT;

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

/* status: is data moving?  One row. */
CREATE VIEW portal_sync.status AS
SELECT w.worker_pid,
	   w.state,
	   o.pending_events,
	   pg_catalog.now() - o.oldest_captured_at AS oldest_pending_age,
	   o.pending_snapshots,
	   (SELECT pg_catalog.count(*) FROM portal_sync.enrollment) AS enrolled_patients,
	   (SELECT pg_catalog.count(*) FROM portal_sync.dead_letter) AS dead_letters,
	   COALESCE(w.delivered_total, 0) AS delivered_total,
	   (SELECT COALESCE(pg_catalog.sum(l.events), 0)::bigint FROM portal_sync.delivery_log l
		WHERE l.accepted_at > pg_catalog.now() - interval '1 minute') AS delivered_last_minute,
	   (SELECT COALESCE(pg_catalog.sum(k.row_count), 0)::bigint FROM portal_sync.skipped_row k) AS skipped_rows,
	   (SELECT pg_catalog.max(l.accepted_at) FROM portal_sync.delivery_log l) AS last_success_at,
	   w.last_error,
	   w.last_error_at,
	   COALESCE(w.consecutive_failures, 0) AS consecutive_failures,
	   w.next_attempt_at
FROM portal_sync.worker_status() w,
	 (SELECT COALESCE(pg_catalog.sum(CASE WHEN op = 's' THEN 1 ELSE pg_catalog.cardinality(keys) END), 0)::bigint
				AS pending_events,
			 pg_catalog.count(*) FILTER (WHERE op = 's')
				+ (SELECT pg_catalog.count(*) FROM portal_sync.resync_queue) AS pending_snapshots,
			 pg_catalog.min(captured_at) AS oldest_captured_at
	  FROM portal_sync.outbox) o;

/* patients: every enrolled patient and where their data stands. */
CREATE VIEW portal_sync.patients AS
SELECT e.patient_id,
	   e.enrolled_at,
	   e.enrolled_by,
	   e.snapshot_requested_at,
	   e.snapshot_accepted_at,
	   (e.snapshot_accepted_at IS NOT NULL AND NOT e.purged) AS ready,
	   COALESCE(o.pending_events, 0) AS pending_events,
	   COALESCE(d.dead_letters, 0) AS dead_letters,
	   e.last_delivered_at
FROM portal_sync.enrollment e
LEFT JOIN (SELECT patient_id,
				  pg_catalog.sum(CASE WHEN op = 's' THEN 1 ELSE pg_catalog.cardinality(keys) END)::bigint
					AS pending_events
		   FROM portal_sync.outbox GROUP BY patient_id) o ON o.patient_id = e.patient_id
LEFT JOIN (SELECT patient_id, pg_catalog.count(*) AS dead_letters
		   FROM portal_sync.dead_letter GROUP BY patient_id) d ON d.patient_id = e.patient_id;

/* dead_letters: events the portal rejected. */
CREATE VIEW portal_sync.dead_letters AS
SELECT event_id, seq, patient_id, source, key, op, failed_at, http_status, reason
FROM portal_sync.dead_letter;

/*
 * explain: "why is this patient's data (not) on the portal?", one row per
 * step, in order.  Runs as the extension's owner so that the DBA's role
 * needs EXECUTE on it only.
 */
CREATE FUNCTION portal_sync.explain(patient_id text)
RETURNS TABLE (step text, ok boolean, detail text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog AS
$$
DECLARE
	p_id ALIAS FOR explain.patient_id;
	e portal_sync.enrollment%ROWTYPE;
	s record;
	st record;
	src record;
	chart_privacy int;
	chart_found boolean;
	n_pending bigint;
	oldest timestamptz;
	n_dead bigint;
	last_reason text;
	by_date bigint;
	by_privacy bigint;
	by_rule bigint;
	initiators text;
BEGIN
	SELECT * INTO s FROM portal_sync.settings;
	SELECT * INTO e FROM portal_sync.enrollment en WHERE en.patient_id = p_id;

	-- enrolled
	IF FOUND THEN
		RETURN QUERY SELECT 'enrolled', true,
			format('enrolled by %s at %s', e.enrolled_by, e.enrolled_at);
	ELSE
		SELECT string_agg(format('%s (%s)', so.name,
							COALESCE('when ' || so.enroll_when, 'any new row')), ', ' ORDER BY so.name)
		INTO initiators
		FROM portal_sync.sources so WHERE so.kind IN ('appointment', 'ccda', 'note', 'pin');
		RETURN QUERY SELECT 'enrolled', false,
			format('not enrolled: only insurance is sent; it starts with a new row in %s, or portal_sync.enroll()',
				   COALESCE(initiators, 'no attached source'));
	END IF;

	-- chart
	SELECT so.* INTO src FROM portal_sync.sources so WHERE so.kind = 'patient';
	IF NOT FOUND THEN
		RETURN QUERY SELECT 'chart', true, 'no patient source attached: every chart counts as unrestricted';
	ELSE
		EXECUTE format('SELECT %s FROM %s t WHERE t.%I = $1::%s',
					   CASE WHEN src.privacy_col IS NULL THEN '0'
							ELSE format('COALESCE(t.%I, 0)', src.privacy_col) END,
					   src.source, src.patient_col,
					   (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
						WHERE a.attrelid = src.source AND a.attname = src.patient_col))
			INTO chart_privacy USING p_id;
		chart_found := chart_privacy IS NOT NULL;
		IF NOT chart_found THEN
			RETURN QUERY SELECT 'chart', false, format('no row in %s: counts as restricted', src.source);
		ELSIF chart_privacy > s.max_privacy_level THEN
			RETURN QUERY SELECT 'chart', false,
				format('restricted: chart privacy %s is above max_privacy_level %s', chart_privacy, s.max_privacy_level);
		ELSE
			RETURN QUERY SELECT 'chart', true,
				format('chart privacy %s is within max_privacy_level %s', chart_privacy, s.max_privacy_level);
		END IF;
	END IF;

	-- snapshot
	IF e.patient_id IS NULL THEN
		RETURN QUERY SELECT 'snapshot', false, 'no snapshot: not enrolled';
	ELSIF e.purged THEN
		RETURN QUERY SELECT 'snapshot', false, 'the portal purged this patient (chart restricted)';
	ELSIF e.snapshot_accepted_at IS NOT NULL THEN
		RETURN QUERY SELECT 'snapshot', true, format('accepted by the portal at %s', e.snapshot_accepted_at);
	ELSE
		RETURN QUERY SELECT 'snapshot', false, format('pending since %s', e.snapshot_requested_at);
	END IF;

	-- pending
	SELECT COALESCE(sum(CASE WHEN o.op = 's' THEN 1 ELSE cardinality(o.keys) END), 0), min(o.captured_at)
	INTO n_pending, oldest
	FROM portal_sync.outbox o WHERE o.patient_id = p_id;
	RETURN QUERY SELECT 'pending', n_pending = 0,
		CASE WHEN n_pending = 0 THEN 'no events waiting'
			 ELSE format('%s events waiting, oldest captured %s ago', n_pending, now() - oldest) END;

	-- dead_letters
	SELECT count(*), (array_agg(d.reason ORDER BY d.failed_at DESC))[1]
	INTO n_dead, last_reason
	FROM portal_sync.dead_letter d WHERE d.patient_id = p_id;
	RETURN QUERY SELECT 'dead_letters', n_dead = 0,
		CASE WHEN n_dead = 0 THEN 'none'
			 ELSE format('%s rejected by the portal; last reason: %s', n_dead, last_reason) END;

	-- withheld, per source
	FOR src IN SELECT so.*, (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
							 WHERE a.attrelid = so.source AND a.attname = so.patient_col) AS patient_type
			   FROM portal_sync.sources so ORDER BY so.name
	LOOP
		BEGIN
			EXECUTE format('SELECT count(*) FILTER (WHERE %s), count(*) FILTER (WHERE %s),'
						   ' count(*) FILTER (WHERE NOT COALESCE((%s), false))'
						   ' FROM %s t WHERE t.%I = $1::%s',
						   CASE WHEN src.date_col IS NULL THEN 'false'
								ELSE format('$2 IS NOT NULL AND t.%I::date < $2', src.date_col) END,
						   CASE WHEN src.privacy_col IS NULL THEN 'false'
								ELSE format('COALESCE(t.%I, 0) > $3', src.privacy_col) END,
						   COALESCE(src.share_when, 'true'),
						   src.source, src.patient_col, src.patient_type)
				INTO by_date, by_privacy, by_rule
				USING p_id, s.date_cutoff, s.max_privacy_level;
			RETURN QUERY SELECT 'withheld', by_date + by_privacy + by_rule = 0,
				format('%s: %s by date, %s by privacy, %s by share_when', src.name, by_date, by_privacy, by_rule);
		EXCEPTION WHEN OTHERS THEN
			-- the message may quote a row: only its SQLSTATE is shown
			RETURN QUERY SELECT 'withheld', false,
				format('%s: the rules fail on a row of this patient (SQLSTATE %s)', src.name, SQLSTATE);
		END;
	END LOOP;

	-- worker
	SELECT * INTO st FROM portal_sync.status;
	RETURN QUERY SELECT 'worker', st.state IN ('running', 'idle'),
		format('%s%s%s', st.state,
			   CASE WHEN st.last_error IS NOT NULL THEN format('; last error: %s (at %s)', st.last_error, st.last_error_at) ELSE '' END,
			   CASE WHEN st.next_attempt_at IS NOT NULL THEN format('; next attempt at %s', st.next_attempt_at) ELSE '' END);
END
$$;

/*
 * A dropped table is no longer attached.  (The settings of attached tables
 * are not dumped by pg_dump: their columns are kept by number, which a
 * restore does not preserve.  After a restore, attach the tables again.)
 */
CREATE FUNCTION portal_sync.forget_dropped_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS
$$
BEGIN
	IF pg_catalog.to_regclass('portal_sync.source') IS NULL THEN
		RETURN;		-- the extension itself is being dropped
	END IF;
	DELETE FROM portal_sync.source s
	USING pg_catalog.pg_event_trigger_dropped_objects() d
	WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
	  AND d.objsubid = 0 AND d.objid = s.relid;
END
$$;
CREATE EVENT TRIGGER portal_sync_forget_dropped_tables ON sql_drop
	EXECUTE FUNCTION portal_sync.forget_dropped_tables();

/* Nothing in the schema is for PUBLIC. */
REVOKE ALL ON ALL TABLES IN SCHEMA portal_sync FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA portal_sync FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA portal_sync FROM PUBLIC;

/* The delivery worker of this database starts now, not at the next scan. */
SELECT portal_sync.start_worker();
