--
-- 01_install: CREATE EXTENSION, the reference EHR schema and the helpers the
-- later tests use.  (Without shared_preload_libraries CREATE EXTENSION must
-- fail with a hint; pg_regress always runs with the preload, see
-- test/regress.conf, so that is tested elsewhere.)
--
\set VERBOSITY default
\set SHOW_CONTEXT never

CREATE EXTENSION portal_sync;
SELECT extname, extversion, extnamespace::regnamespace AS schema, extrelocatable
FROM pg_extension WHERE extname = 'portal_sync';

-- Twice is an error, not a second copy.
CREATE EXTENSION portal_sync;
\echo :SQLSTATE

-- The capture half of the contract (SPEC 3, 4).
SELECT n AS object, to_regclass(n) IS NOT NULL AS present
FROM unnest(ARRAY['portal_sync.settings', 'portal_sync.source',
				  'portal_sync.outbox', 'portal_sync.enrollment',
				  'portal_sync.skipped_row', 'portal_sync.sources',
				  'portal_sync.metrics']) AS n;
SELECT n AS function, to_regprocedure(n) IS NOT NULL AS present
FROM unnest(ARRAY['portal_sync.attach(regclass,text,name,name,name,name,text,text,text,name[])',
				  'portal_sync.detach(regclass,boolean)',
				  'portal_sync.enroll(text)']) AS n;

-- settings: one row with the documented defaults.
SELECT * FROM portal_sync.settings;
SELECT practice_id = current_database() AS practice_id_is_db FROM portal_sync.settings;

-- Nothing attached, queued or enrolled yet.
SELECT count(*) FROM portal_sync.sources;
SELECT count(*) FROM portal_sync.outbox;
SELECT count(*) FROM portal_sync.enrollment;
SELECT count(*) FROM portal_sync.skipped_row;

-- Settings (GUCs) and their defaults (SPEC 2).
SELECT name, current_setting(name) AS value, context
FROM pg_settings WHERE name LIKE 'portal_sync.%' ORDER BY name;

-- The reference EHR schema of a pediatric practice.
\set ECHO none
\i test/reference_schema.sql
\set ECHO all
SELECT c.relname, count(a.attnum) AS columns
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relnamespace = 'ehr'::regnamespace AND c.relkind = 'r'
GROUP BY c.relname ORDER BY c.relname;

--
-- Helpers for the later tests (schema regress_util, never granted to the
-- ordinary role of 06_privileges).
--
CREATE SCHEMA regress_util;

-- new_events(): the outbox rows queued since the last call, without seq or
-- timestamps: one row per outbox row, ordered by patient then seq (the
-- order of the rows of different patients written by one statement is not
-- part of the contract; a patient's own order is).  Keys are sorted.
CREATE TABLE regress_util.mark (seq bigint NOT NULL);
INSERT INTO regress_util.mark VALUES (0);
CREATE FUNCTION regress_util.new_events()
RETURNS TABLE (patient_id text, source text, op "char", keys text[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
	m bigint;
BEGIN
	SELECT mk.seq INTO m FROM regress_util.mark mk;
	RETURN QUERY
		SELECT o.patient_id::text, s.name, o.op,
			   CASE WHEN o.keys IS NULL THEN NULL
					ELSE ARRAY(SELECT k FROM unnest(o.keys) AS k
							   ORDER BY length(k), k) END
		FROM portal_sync.outbox o
		LEFT JOIN portal_sync.source s ON s.source_id = o.source_id
		WHERE o.seq > m
		ORDER BY o.patient_id, o.seq;
	UPDATE regress_util.mark mk
	SET seq = coalesce((SELECT max(o.seq) FROM portal_sync.outbox o), mk.seq);
END
$$;

-- enrolled(): who is enrolled (settled by the worker or still an
-- enrollment request), by what, and how many snapshot requests (op 'e'
-- enrollment, op 's' resync) of the patient are queued.
CREATE FUNCTION regress_util.enrolled()
RETURNS TABLE (patient_id text, enrolled_by text, snapshot_requests bigint)
LANGUAGE sql AS $$
	SELECT e.patient_id::text, e.enrolled_by,
		   (SELECT count(*) FROM portal_sync.outbox o
			WHERE o.patient_id = e.patient_id AND o.op IN ('s', 'e'))
	FROM portal_sync.patients e
	ORDER BY e.patient_id
$$;

-- skipped(): rows skipped for a NULL patient, per source.
CREATE FUNCTION regress_util.skipped()
RETURNS TABLE (source text, statements bigint, rows numeric)
LANGUAGE sql AS $$
	SELECT coalesce(s.name, '(detached)'), count(*), sum(k.row_count)
	FROM portal_sync.skipped_row k
	LEFT JOIN portal_sync.source s ON s.source_id = k.source_id
	GROUP BY s.name ORDER BY s.name
$$;

SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.enrolled();
