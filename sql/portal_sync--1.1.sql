/* portal_sync--1.1.sql */

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
 * source: one row per attached table.  Nothing here depends on what a
 * dump and restore (or pg_upgrade) changes: the table is a regclass
 * (dumped as its name, restored to the new table), its columns are kept
 * by name and the rules as their SQL text, which capture and the worker
 * parse and analyze when they load the settings.  Renaming a column the
 * settings name (ALTER TABLE ... RENAME COLUMN) rewrites the names and the
 * rules here in the same transaction (attachment_ddl.c).  Dumped with the
 * extension's data, source_id included, so that restored outbox rows
 * still name their source; its sequence is one of its own, not an
 * identity, so that pg_dump dumps where it stands too.
 */
CREATE SEQUENCE portal_sync.source_id_seq AS int;
CREATE TABLE portal_sync.source (
	source_id int PRIMARY KEY DEFAULT pg_catalog.nextval('portal_sync.source_id_seq'::pg_catalog.regclass),
	relid regclass NOT NULL UNIQUE,
	kind text NOT NULL CHECK (kind IN ('appointment', 'ccda', 'note', 'pin',
									   'insurance', 'clinical', 'patient')),
	name text NOT NULL UNIQUE CHECK (name <> ''),
	patient_col name NOT NULL,
	key_col name NOT NULL,
	date_col name,
	privacy_col name,
	share_when text,			/* as deparsed, names qualified but pg_catalog's */
	enroll_when text,
	attached_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	columns name[]				/* the columns sent in data; NULL: all */
);

/*
 * Any change of the settings, also one that pg_restore makes with COPY,
 * tells every backend's capture and the worker to load them again.
 */
CREATE FUNCTION portal_sync.source_changed() RETURNS trigger
	AS 'MODULE_PATHNAME', 'portal_sync_source_changed' LANGUAGE C;
CREATE TRIGGER source_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
	ON portal_sync.source
	FOR EACH STATEMENT EXECUTE FUNCTION portal_sync.source_changed();

/*
 * outbox: what changed, never the clinical content.  One row records that
 * the rows with the given keys of one source changed for one patient in one
 * statement (op 'i' insert, 'u' update, 'd' delete), or that a patient's
 * whole record must be sent: op 's' (a resync) or 'e' (an enrollment; its
 * one key says by what), or that the patient was un-enrolled: op 'x' (a
 * purge, then nothing until a new enrollment).  Delivery reads the committed rows in seq order
 * (seq is the queue position; the wire seq is taken when an event is
 * first sent) and each changed row as it is at send time.  Only ever
 * appended to by the EHR's transactions: none waits for another here.
 * WAL-logged: nothing captured is lost on a crash.
 */
CREATE SEQUENCE portal_sync.outbox_seq;

/*
 * seq never goes backwards for a practice, also across DROP EXTENSION and
 * CREATE EXTENSION: an installation starts its seqs at the microseconds
 * since 2000-01-01 at its creation, above every seq an earlier
 * installation of the database handed out unless that one averaged more
 * than a million events a second over its whole life.  Seqs stay below
 * 2^53, exact in every JSON parser, until the year 2285.  adopt() moves a
 * copy's seqs up to its clock the same way, since the original may have
 * gone on sending after the dump.
 */
CREATE FUNCTION portal_sync.advance_seq_to_clock() RETURNS bigint
LANGUAGE sql VOLATILE SET search_path = pg_catalog AS
$$
	SELECT pg_catalog.setval('portal_sync.outbox_seq',
		GREATEST(s.last_value,
				 ((EXTRACT(EPOCH FROM pg_catalog.clock_timestamp()) - 946684800) * 1000000)::bigint))
	FROM portal_sync.outbox_seq s
$$;
SELECT portal_sync.advance_seq_to_clock();
CREATE TABLE portal_sync.outbox (
	seq bigint PRIMARY KEY,
	patient_id text COLLATE "C" NOT NULL,
	source_id int,
	op "char" NOT NULL CHECK (op IN ('i', 'u', 'd', 's', 'e', 'x')),
	keys text[],
	captured_at timestamptz NOT NULL
);
CREATE INDEX outbox_enroll_request ON portal_sync.outbox (patient_id) WHERE op = 'e';
CREATE INDEX outbox_unenroll_request ON portal_sync.outbox (patient_id) WHERE op = 'x';

/*
 * enrollment: patients whose data flows to the portal, with the initiating
 * event that started it.  Delivery state of the patient's snapshot lives
 * here too.
 */
CREATE TABLE portal_sync.enrollment (
	patient_id text COLLATE "C" PRIMARY KEY,
	enrolled_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	enrolled_by text NOT NULL,
	snapshot_seq bigint,				/* wire seq of the snapshot of ... */
	snapshot_request bigint,		/* ... this outbox request (sent, maybe unanswered) */
	snapshot_requested_at timestamptz,
	snapshot_accepted_at timestamptz,
	purged boolean NOT NULL DEFAULT false,	/* chart restricted: portal purged */
	last_delivered_at timestamptz
);

/*
 * installation: identifies this database's stream, so that event ids of
 * two databases sending to one portal never collide.
 */
CREATE FUNCTION portal_sync.database_identity() RETURNS text
	AS 'MODULE_PATHNAME', 'portal_sync_database_identity' LANGUAGE C STABLE STRICT;
-- A patient id or key as the outbox and the wire write it, the same in
-- every session (ISO dates, UTC, shortest exact floats, no numeric
-- trailing zeros, no char(n) padding).
CREATE FUNCTION portal_sync.value_text(anyelement) RETURNS text
	AS 'MODULE_PATHNAME', 'portal_sync_value_text' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
CREATE TABLE portal_sync.installation (
	singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
	install_id text NOT NULL DEFAULT pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', ''),
	/* the database the stream belongs to: a copy differs, and waits for adopt() */
	database_identity text NOT NULL DEFAULT portal_sync.database_identity()
);
INSERT INTO portal_sync.installation DEFAULT VALUES;

/*
 * An inserted row replaces the values of the one row instead of adding a
 * second: that is how pg_restore brings back the installation of the
 * dumped database (its id, and the database it belongs to, which makes
 * the restored one a copy that waits for adopt()).
 */
CREATE FUNCTION portal_sync.installation_merge_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS
$$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM portal_sync.installation) THEN
		RETURN NEW;
	END IF;
	UPDATE portal_sync.installation
	SET install_id = NEW.install_id, database_identity = NEW.database_identity;
	RETURN NULL;
END
$$;
CREATE TRIGGER installation_merge_insert BEFORE INSERT ON portal_sync.installation
	FOR EACH ROW EXECUTE FUNCTION portal_sync.installation_merge_insert();

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

/*
 * retraction: tables detached with retract => true whose deletes are still
 * being delivered.  detach() queues, in the outbox under the table's old
 * source_id, a delete of every row of it the portal may hold; the worker
 * sends every outbox entry of a retracted source as deletes, and forgets
 * the retraction once none is left.  Name and kind are all it needs: the
 * table itself may be gone by then.
 */
CREATE TABLE portal_sync.retraction (
	source_id int PRIMARY KEY,
	name text NOT NULL,
	kind text NOT NULL,
	requested_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

SELECT pg_catalog.pg_extension_config_dump('portal_sync.settings', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.retraction', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.source', '');
SELECT pg_catalog.pg_extension_config_dump('portal_sync.source_id_seq', '');
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
								   name text DEFAULT NULL,
								   columns name[] DEFAULT NULL)
	RETURNS void
	AS 'MODULE_PATHNAME', 'portal_sync_attach' LANGUAGE C CALLED ON NULL INPUT;

CREATE FUNCTION portal_sync.detach(source regclass, retract boolean DEFAULT false) RETURNS void
	AS 'MODULE_PATHNAME', 'portal_sync_detach' LANGUAGE C STRICT;

CREATE FUNCTION portal_sync.enroll(patient_id text) RETURNS boolean
	AS 'MODULE_PATHNAME', 'portal_sync_enroll' LANGUAGE C STRICT;

CREATE FUNCTION portal_sync.unenroll(patient_id text) RETURNS boolean
	AS 'MODULE_PATHNAME', 'portal_sync_unenroll' LANGUAGE C STRICT;

CREATE FUNCTION portal_sync.adopt() RETURNS void
	AS 'MODULE_PATHNAME', 'portal_sync_adopt' LANGUAGE C STRICT;

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
	OUT delivered_total bigint, OUT hold_reason text)
	RETURNS record
	AS 'MODULE_PATHNAME', 'portal_sync_worker_status' LANGUAGE C STRICT;

/* sources: the attached tables with their settings. */
CREATE VIEW portal_sync.sources AS
SELECT s.name,
	   s.relid AS source,
	   s.kind,
	   s.patient_col,
	   s.key_col,
	   s.date_col,
	   s.privacy_col,
	   s.share_when,
	   s.enroll_when,
	   s.columns,
	   s.attached_at
FROM portal_sync.source s;

/*
 * rule_error: rows withheld because a share_when failed on them, counted
 * per source and SQLSTATE by the worker (its only writer); never the
 * row's values.
 */
CREATE TABLE portal_sync.rule_error (
	source_id int NOT NULL REFERENCES portal_sync.source ON DELETE CASCADE,
	sqlstate text NOT NULL,
	errors bigint NOT NULL,
	last_error_at timestamptz NOT NULL,
	PRIMARY KEY (source_id, sqlstate)
);

/*
 * capture_disabled_tables(): attached tables whose capture cannot fire
 * for the EHR's sessions: a capture trigger disabled (ALTER TABLE ...
 * DISABLE TRIGGER, pg_restore --disable-triggers left behind), set to
 * fire on replicas only, or missing; every table when the sessions'
 * default session_replication_role is replica (the triggers fire in
 * origin mode).  For a partitioned table, each of its partitions whose
 * capture cannot fire is named.
 */
CREATE FUNCTION portal_sync.capture_disabled_tables() RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS
$$
SELECT COALESCE(array_agg(r.relid::regclass::text ORDER BY r.relid::regclass::text), '{}')
FROM portal_sync.source s
CROSS JOIN LATERAL (SELECT s.relid
					UNION SELECT p.relid FROM pg_partition_tree(s.relid) p) r(relid)
WHERE (SELECT g.reset_val FROM pg_settings g WHERE g.name = 'session_replication_role') = 'replica'
   OR (SELECT count(*) FROM pg_trigger t
	   WHERE t.tgrelid = r.relid AND t.tgname LIKE 'portal\_sync\_capture\_%'
		 AND t.tgenabled IN ('O', 'A')) < 4
$$;

/*
 * status: is data moving?  One row.  An enrollment request ('e') not yet
 * settled by the worker counts as an enrolled patient and a pending
 * snapshot.
 */
CREATE VIEW portal_sync.status AS
SELECT w.worker_pid,
	   w.state,
	   o.pending_events,
	   pg_catalog.now() - o.oldest_captured_at AS oldest_pending_age,
	   o.pending_snapshots,
	   (SELECT pg_catalog.count(*) FROM portal_sync.enrollment)
		 + (SELECT pg_catalog.count(DISTINCT r.patient_id) FROM portal_sync.outbox r
			WHERE r.op = 'e' AND NOT EXISTS (SELECT 1 FROM portal_sync.enrollment e
											 WHERE e.patient_id = r.patient_id)) AS enrolled_patients,
	   (SELECT pg_catalog.count(*) FROM portal_sync.dead_letter) AS dead_letters,
	   COALESCE(w.delivered_total, 0) AS delivered_total,
	   (SELECT COALESCE(pg_catalog.sum(l.events), 0)::bigint FROM portal_sync.delivery_log l
		WHERE l.accepted_at > pg_catalog.now() - interval '1 minute') AS delivered_last_minute,
	   (SELECT COALESCE(pg_catalog.sum(k.row_count), 0)::bigint FROM portal_sync.skipped_row k) AS skipped_rows,
	   (SELECT COALESCE(pg_catalog.sum(r.errors), 0)::bigint FROM portal_sync.rule_error r) AS rule_errors,
	   portal_sync.capture_disabled_tables() AS capture_disabled,
	   (SELECT pg_catalog.max(l.accepted_at) FROM portal_sync.delivery_log l) AS last_success_at,
	   CASE WHEN w.state = 'waiting' AND w.hold_reason IS NOT NULL
			THEN COALESCE(w.last_error || '; ', '') || 'held back: ' || w.hold_reason
			ELSE w.last_error END AS last_error,
	   w.last_error_at,
	   COALESCE(w.consecutive_failures, 0) AS consecutive_failures,
	   w.next_attempt_at
FROM portal_sync.worker_status() w,
	 (SELECT COALESCE(pg_catalog.sum(CASE WHEN op IN ('s', 'e') THEN 1 ELSE pg_catalog.cardinality(keys) END), 0)::bigint
				AS pending_events,
			 pg_catalog.count(*) FILTER (WHERE op IN ('s', 'e'))
				+ (SELECT pg_catalog.count(*) FROM portal_sync.resync_queue) AS pending_snapshots,
			 pg_catalog.min(captured_at) AS oldest_captured_at
	  FROM portal_sync.outbox) o;

/*
 * metrics: portal_sync.status for monitoring (Prometheus through
 * postgres_exporter), one row, cheap enough to read every few seconds on
 * an outbox of millions of rows: the outbox is read through its indexes,
 * never scanned.  Pending events are counted exactly over the first 1000
 * outbox rows (in seq order); past them they are estimated from the seq
 * range left, at the density (rows per seq, events per row) of those
 * first rows; pending_events_exact says which.  The worker's figures come from shared
 * memory; delivered_total is NULL while no worker runs.  Granted to the
 * predefined role pg_monitor, with worker_metrics(): no clinical content,
 * no error text.
 */
CREATE FUNCTION portal_sync.worker_metrics(OUT state text, OUT consecutive_failures int,
	OUT delivered_total bigint, OUT auth_failure boolean)
	RETURNS record
	AS 'MODULE_PATHNAME', 'portal_sync_worker_metrics' LANGUAGE C STRICT;
CREATE INDEX outbox_resync_request ON portal_sync.outbox (patient_id) WHERE op = 's';

CREATE VIEW portal_sync.metrics AS
SELECT pg_catalog.current_database() AS datname,
	   w.state AS worker_state,
	   ARRAY['running', 'idle', 'waiting', 'backing_off', 'disabled', 'unconfigured',
			 'needs_adoption', 'waiting_for_worker', 'not_running']
		 || CASE WHEN w.state IN ('running', 'idle', 'waiting', 'backing_off', 'disabled',
								  'unconfigured', 'needs_adoption', 'waiting_for_worker',
								  'not_running')
				 THEN '{}'::text[] ELSE ARRAY[w.state] END AS worker_states,
	   h.events + COALESCE(pg_catalog.round((t.last_seq - h.last_seq)::numeric * h.events
											/ (h.last_seq - h.first_seq + 1))::bigint,
						   0) AS pending_events,
	   h.entries < 1000 OR t.last_seq = h.last_seq AS pending_events_exact,
	   COALESCE(EXTRACT(epoch FROM pg_catalog.now() - h.oldest_captured_at), 0)::float8
		 AS oldest_pending_age_seconds,
	   (SELECT pg_catalog.count(*) FROM portal_sync.outbox r WHERE r.op = 'e')
		 + (SELECT pg_catalog.count(*) FROM portal_sync.outbox r WHERE r.op = 's')
		 + (SELECT pg_catalog.count(*) FROM portal_sync.resync_queue) AS pending_snapshots,
	   w.delivered_total,
	   (SELECT pg_catalog.count(*) FROM portal_sync.dead_letter) AS dead_letters,
	   (SELECT COALESCE(pg_catalog.sum(r.errors), 0)::bigint FROM portal_sync.rule_error r) AS rule_errors_total,
	   w.consecutive_failures,
	   EXTRACT(epoch FROM pg_catalog.now() - s.last_success_at)::float8 AS last_success_age_seconds,
	   w.auth_failure
FROM portal_sync.worker_metrics() w,
	 (SELECT pg_catalog.count(*) AS entries,
			 COALESCE(pg_catalog.sum(CASE WHEN f.op IN ('s', 'e') THEN 1
										  ELSE pg_catalog.cardinality(f.keys) END), 0)::bigint AS events,
			 pg_catalog.min(f.seq) AS first_seq,
			 pg_catalog.max(f.seq) AS last_seq,
			 pg_catalog.min(f.captured_at) AS oldest_captured_at
	  FROM (SELECT o.seq, o.op, o.keys, o.captured_at FROM portal_sync.outbox o
			ORDER BY o.seq LIMIT 1000) f) h,
	 (SELECT pg_catalog.max(o.seq) AS last_seq FROM portal_sync.outbox o) t,
	 (SELECT pg_catalog.max(l.accepted_at) AS last_success_at
	  FROM (SELECT l.accepted_at FROM portal_sync.delivery_log l
			WHERE l.accepted_at IS NOT NULL ORDER BY l.sent_at DESC LIMIT 16) l) s;
REVOKE ALL ON portal_sync.metrics FROM PUBLIC;
REVOKE ALL ON FUNCTION portal_sync.worker_metrics() FROM PUBLIC;
GRANT USAGE ON SCHEMA portal_sync TO pg_monitor;
GRANT SELECT ON portal_sync.metrics TO pg_monitor;
GRANT EXECUTE ON FUNCTION portal_sync.worker_metrics() TO pg_monitor;

/*
 * patients: every enrolled patient and where their data stands; a
 * patient whose enrollment request the worker has not settled yet is
 * listed with the request.
 */
CREATE VIEW portal_sync.patients AS
WITH enrolled AS (
	SELECT e.patient_id, e.enrolled_at, e.enrolled_by, e.snapshot_requested_at,
		   e.snapshot_accepted_at, e.purged, e.last_delivered_at
	FROM portal_sync.enrollment e
	UNION ALL
	SELECT DISTINCT ON (r.patient_id) r.patient_id, r.captured_at, r.keys[1], r.captured_at,
		   NULL::timestamptz, false, NULL::timestamptz
	FROM portal_sync.outbox r
	WHERE r.op = 'e' AND NOT EXISTS (SELECT 1 FROM portal_sync.enrollment e
									 WHERE e.patient_id = r.patient_id)
	ORDER BY 1, 2)
SELECT e.patient_id,
	   e.enrolled_at,
	   e.enrolled_by,
	   e.snapshot_requested_at,
	   e.snapshot_accepted_at,
	   (e.snapshot_accepted_at IS NOT NULL AND NOT e.purged) AS ready,
	   COALESCE(o.pending_events, 0) AS pending_events,
	   COALESCE(d.dead_letters, 0) AS dead_letters,
	   e.last_delivered_at
FROM enrolled e
LEFT JOIN (SELECT patient_id,
				  pg_catalog.sum(CASE WHEN op IN ('s', 'e') THEN 1 ELSE pg_catalog.cardinality(keys) END)::bigint
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
	by_error bigint;
	error_states text;
	row_key text;
	row_by_date boolean;
	row_by_privacy boolean;
	row_by_rule boolean;
	initiators text;
BEGIN
	SELECT * INTO s FROM portal_sync.settings;
	SELECT * INTO e FROM portal_sync.enrollment en WHERE en.patient_id = p_id;
	IF NOT FOUND THEN
		-- an enrollment request the worker has not settled yet
		SELECT r.patient_id, r.captured_at, r.keys[1], NULL, r.captured_at
		INTO e.patient_id, e.enrolled_at, e.enrolled_by, e.snapshot_seq, e.snapshot_requested_at
		FROM portal_sync.outbox r WHERE r.op = 'e' AND r.patient_id = p_id ORDER BY r.seq LIMIT 1;
		e.purged := false;
	END IF;

	-- enrolled
	IF e.patient_id IS NOT NULL THEN
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
		-- an enrollment snapshot waits for writing transactions open at the enrollment
		SELECT string_agg(format('pid %s (xid %s, %s since %s)', a.pid, a.backend_xid, a.state, a.xact_start), ', ')
		INTO initiators
		FROM pg_stat_activity a
		WHERE a.backend_xid IS NOT NULL AND a.xact_start <= e.enrolled_at AND a.pid <> pg_backend_pid()
		  AND EXISTS (SELECT 1 FROM portal_sync.outbox r WHERE r.op = 'e' AND r.patient_id = p_id);
		SELECT initiators || COALESCE(', ' || string_agg(format('prepared transaction %L (xid %s)', x.gid, x.transaction), ', '), '')
		INTO initiators
		FROM pg_prepared_xacts x
		WHERE x.prepared <= e.enrolled_at AND x.database = current_database()
		  AND EXISTS (SELECT 1 FROM portal_sync.outbox r WHERE r.op = 'e' AND r.patient_id = p_id);
		RETURN QUERY SELECT 'snapshot', false,
			format('pending since %s%s', e.snapshot_requested_at,
				   CASE WHEN initiators IS NOT NULL
						THEN '; it waits for writing transactions that were open when the patient was enrolled: ' || initiators
						ELSE '' END);
	END IF;

	-- pending
	SELECT COALESCE(sum(CASE WHEN o.op IN ('s', 'e') THEN 1 ELSE cardinality(o.keys) END), 0), min(o.captured_at)
	INTO n_pending, oldest
	FROM portal_sync.outbox o WHERE o.patient_id = p_id;
	SELECT * INTO st FROM portal_sync.worker_status();
	RETURN QUERY SELECT 'pending', n_pending = 0,
		CASE WHEN n_pending = 0 THEN 'no events waiting'
			 ELSE format('%s events waiting, oldest captured %s ago%s', n_pending, now() - oldest,
						 CASE WHEN st.state = 'waiting' AND st.hold_reason IS NOT NULL
							  THEN '; held back: ' || st.hold_reason ELSE '' END) END;

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
			-- the rules fail on some row: count row by row; a row they
			-- fail on is withheld (the message may quote it: only its
			-- SQLSTATE is shown)
			by_date := 0; by_privacy := 0; by_rule := 0; by_error := 0; error_states := NULL;
			FOR row_key IN EXECUTE format('SELECT t.%I::text FROM %s t WHERE t.%I = $1::%s',
										  src.key_col, src.source, src.patient_col, src.patient_type)
				USING p_id
			LOOP
				BEGIN
					EXECUTE format('SELECT %s, %s, NOT COALESCE((%s), false) FROM %s t WHERE t.%I = $1::%s',
								   CASE WHEN src.date_col IS NULL THEN 'false'
										ELSE format('$2 IS NOT NULL AND t.%I::date < $2', src.date_col) END,
								   CASE WHEN src.privacy_col IS NULL THEN 'false'
										ELSE format('COALESCE(t.%I, 0) > $3', src.privacy_col) END,
								   COALESCE(src.share_when, 'true'),
								   src.source, src.key_col,
								   (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
									WHERE a.attrelid = src.source AND a.attname = src.key_col))
						INTO row_by_date, row_by_privacy, row_by_rule
						USING row_key, s.date_cutoff, s.max_privacy_level;
					by_date := by_date + row_by_date::int;
					by_privacy := by_privacy + row_by_privacy::int;
					by_rule := by_rule + row_by_rule::int;
				EXCEPTION WHEN OTHERS THEN
					by_error := by_error + 1;
					IF error_states IS NULL OR position(SQLSTATE IN error_states) = 0 THEN
						error_states := COALESCE(error_states || ', ', '') || SQLSTATE;
					END IF;
				END;
			END LOOP;
			RETURN QUERY SELECT 'withheld', false,
				format('%s: %s by date, %s by privacy, %s by share_when, %s by rule errors (SQLSTATE %s)',
					   src.name, by_date, by_privacy, by_rule, by_error, error_states);
		END;
	END LOOP;

	-- capture
	SELECT string_agg(c, ', ') INTO initiators FROM unnest(portal_sync.capture_disabled_tables()) c;
	RETURN QUERY SELECT 'capture', initiators IS NULL,
		CASE WHEN initiators IS NULL THEN 'every attached table captures its changes'
			 ELSE 'capture cannot fire for: ' || initiators
				  || ' (a capture trigger is disabled or missing, or session_replication_role is replica):'
				  || ' changes to those tables are not sent; re-enable the triggers (ALTER TABLE ... ENABLE TRIGGER ALL) and run portal_sync.resync_all()' END;

	-- worker
	SELECT * INTO st FROM portal_sync.status;
	RETURN QUERY SELECT 'worker', st.state IN ('running', 'idle', 'waiting'),
		format('%s%s%s', st.state,
			   CASE WHEN st.last_error IS NOT NULL THEN format('; last error: %s (at %s)', st.last_error, st.last_error_at) ELSE '' END,
			   CASE WHEN st.next_attempt_at IS NOT NULL THEN format('; next attempt at %s', st.next_attempt_at) ELSE '' END);
END
$$;

/* A dropped table is no longer attached. */
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
