--
-- test/demo.sh, the end: what the database says should be on the portal
-- (SPEC section 4, computed here independently of the extension) against
-- what the portal holds (GET /_control/state, loaded from CSV files).
--
-- psql variable: statedir (items.csv, patients.csv, meta.csv).
-- Prints a few dozen lines; the last one is "RESULT: OK" or "RESULT: MISMATCH".
--
\set QUIET on
\pset footer off
\pset tuples_only on
\pset format unaligned

CREATE TABLE demo.portal_item (patient_id text, source text, key text, data jsonb);
CREATE TABLE demo.portal_patient (patient_id text, purged boolean, snapshots int,
								  open_snapshot bigint, applied bigint);
CREATE TABLE demo.portal_meta (name text PRIMARY KEY, value bigint);
\set items_csv :statedir '/items.csv'
\set patients_csv :statedir '/patients.csv'
\set meta_csv :statedir '/meta.csv'
COPY demo.portal_item FROM :'items_csv' (FORMAT csv);
COPY demo.portal_patient FROM :'patients_csv' (FORMAT csv);
COPY demo.portal_meta FROM :'meta_csv' (FORMAT csv);
CREATE FUNCTION pg_temp.m(text) RETURNS bigint LANGUAGE sql STABLE AS
$$ SELECT coalesce((SELECT value FROM demo.portal_meta WHERE name = $1), 0) $$;

-- The patients that matter: enrolled, on the portal, or whose insurance
-- the demo changed.  (Rows of other patients can be neither expected on the
-- portal nor on it.)
CREATE TABLE demo.relevant AS
SELECT patient_id::text AS patient_id FROM portal_sync.enrollment
UNION SELECT patient_id FROM demo.portal_patient
UNION SELECT patient_id::text FROM demo.touched_insurance;

-- Their rows in every attached table, with the sharing rules of SPEC 4
-- evaluated on each, from portal_sync.sources and portal_sync.settings.
CREATE FUNCTION demo.db_items()
RETURNS TABLE(source text, kind text, patient_id text, key text,
			  date_ok boolean, privacy_ok boolean, share_ok boolean, data jsonb)
LANGUAGE plpgsql AS $fn$
DECLARE
	s record;
	st record;
BEGIN
	SELECT * INTO st FROM portal_sync.settings;
	FOR s IN SELECT * FROM portal_sync.sources LOOP
		RETURN QUERY EXECUTE format(
			'SELECT %L::text, %L::text, t.%I::text, t.%I::text, %s, %s, %s, to_jsonb(t)'
			' FROM %s t WHERE t.%I::text IN (SELECT r.patient_id FROM demo.relevant r)',
			s.name, s.kind, s.patient_col, s.key_col,
			CASE WHEN s.date_col IS NULL OR st.date_cutoff IS NULL THEN 'true'
				 ELSE format('(t.%I IS NULL OR t.%I::date >= %L::date)', s.date_col, s.date_col, st.date_cutoff) END,
			CASE WHEN s.privacy_col IS NULL THEN 'true'
				 ELSE format('coalesce(t.%I, 0) <= %s', s.privacy_col, st.max_privacy_level) END,
			CASE WHEN s.share_when IS NULL THEN 'true'
				 ELSE format('coalesce((%s), false)', s.share_when) END,
			s.source, s.patient_col);
	END LOOP;
END
$fn$;

CREATE TABLE demo.raw_item AS SELECT * FROM demo.db_items();
-- The chart rule: the patient source's privacy; no chart row = restricted
-- (with no patient source attached, every chart is unrestricted).
CREATE TABLE demo.chart AS
SELECT patient_id, bool_and(privacy_ok) AS chart_ok FROM demo.raw_item WHERE kind = 'patient' GROUP BY 1;
CREATE TABLE demo.item AS
SELECT x.*, x.date_ok AND x.privacy_ok AND x.share_ok AND x.chart_ok AS shareable,
	   x.date_ok AND x.privacy_ok AND x.share_ok AND x.chart_ok AND (x.enrolled OR x.pushed_insurance) AS expected
FROM (
	SELECT r.*,
		   coalesce(c.chart_ok, NOT EXISTS (SELECT 1 FROM portal_sync.sources WHERE kind = 'patient')) AS chart_ok,
		   e.patient_id IS NOT NULL AS enrolled,
		   t.ins_id IS NOT NULL AS pushed_insurance
	FROM demo.raw_item r
	LEFT JOIN demo.chart c ON c.patient_id = r.patient_id
	LEFT JOIN portal_sync.enrollment e ON e.patient_id = r.patient_id COLLATE "C"
	LEFT JOIN demo.touched_insurance t ON r.kind = 'insurance' AND t.ins_id::text = r.key) x;

-- Portal item against database row (same patient, source and key).
CREATE TABLE demo.cmp AS
SELECT coalesce(i.patient_id, p.patient_id) AS patient_id, coalesce(i.source, p.source) AS source,
	   coalesce(i.key, p.key) AS key, i.kind, i.enrolled, i.pushed_insurance,
	   i.date_ok, i.privacy_ok, i.share_ok, i.chart_ok, i.shareable,
	   coalesce(i.expected, false) AS expected,
	   p.key IS NOT NULL AS on_portal,
	   i.key IS NOT NULL AS in_db,
	   p.patient_id AS portal_patient,
	   (p.key IS NOT NULL AND i.key IS NOT NULL AND p.data IS DISTINCT FROM i.data) AS stale
FROM demo.item i
FULL JOIN demo.portal_item p ON p.patient_id = i.patient_id AND p.source = i.source AND p.key = i.key
WHERE i.expected OR p.key IS NOT NULL OR i.enrolled;

\echo
\echo '== Enrollment: initiating events (demo.event) against portal_sync.patients'
WITH first AS (
	SELECT DISTINCT ON (patient_id) patient_id::text AS patient_id, event
	FROM demo.event WHERE enrolls ORDER BY patient_id, n),
exp AS (
	SELECT patient_id, CASE event WHEN 'note_enrolling' THEN 'visit_note' WHEN 'pin_op' THEN 'pin' ELSE event END AS by
	FROM first),
act AS (SELECT patient_id, enrolled_by, ready FROM portal_sync.patients),
j AS (SELECT coalesce(exp.by, '(none expected)') AS by, exp.patient_id IS NOT NULL AS e,
			 act.patient_id IS NOT NULL AS a, exp.by IS NOT DISTINCT FROM act.enrolled_by AS same, act.ready
	  FROM exp FULL JOIN act USING (patient_id))
SELECT format('  %-26s expected %4s  enrolled %4s  same event %4s  ready %4s   %s',
			  'by ' || by, count(*) FILTER (WHERE e), count(*) FILTER (WHERE a),
			  count(*) FILTER (WHERE e AND a AND same), count(*) FILTER (WHERE ready),
			  CASE WHEN count(*) FILTER (WHERE e AND a AND same) = count(*) FILTER (WHERE e)
						AND count(*) FILTER (WHERE a) = count(*) FILTER (WHERE e) THEN 'OK' ELSE 'MISMATCH' END)
FROM j GROUP BY by
ORDER BY array_position('{appointment,ccda,visit_note,pin}', by) NULLS LAST;

SELECT format('  %-26s %4s patients, enrolled %4s   %s', x.label, count(DISTINCT d.patient_id),
			  count(DISTINCT d.patient_id) FILTER (WHERE e.patient_id IS NOT NULL),
			  CASE WHEN count(DISTINCT d.patient_id) FILTER (WHERE e.patient_id IS NOT NULL) = 0 THEN 'OK' ELSE 'MISMATCH' END)
FROM (VALUES ('pin_portal', 'only a PORTAL PIN'), ('note_other', 'only phone/nurse notes'),
			 ('insurance', 'only insurance changes')) x(event, label)
JOIN demo.event d ON d.event = x.event
LEFT JOIN portal_sync.enrollment e ON e.patient_id = d.patient_id::text
WHERE NOT EXISTS (SELECT 1 FROM demo.event d2 WHERE d2.patient_id = d.patient_id AND d2.enrolls)
GROUP BY x.label, x.event ORDER BY x.event DESC;

WITH r AS (
	SELECT e.patient_id, e.ready, coalesce(c.chart_ok, false) AS chart_ok,
		   pp.snapshots, pp.purged, pp.open_snapshot
	FROM portal_sync.patients e
	LEFT JOIN demo.chart c USING (patient_id)
	LEFT JOIN demo.portal_patient pp USING (patient_id))
SELECT format('  %s enrolled of %s patients: %s ready, %s with a restricted chart (not ready by design); '
			  'portal: %s with an accepted snapshot, %s purged   %s',
			  count(*), (SELECT count(*) FROM ehr.patient),
			  count(*) FILTER (WHERE ready), count(*) FILTER (WHERE NOT chart_ok),
			  count(*) FILTER (WHERE snapshots > 0 AND NOT purged AND open_snapshot IS NULL),
			  count(*) FILTER (WHERE purged),
			  CASE WHEN count(*) FILTER (WHERE chart_ok AND NOT ready) = 0
					AND count(*) FILTER (WHERE ready AND NOT (snapshots > 0 AND NOT purged AND open_snapshot IS NULL)) = 0
				   THEN 'OK' ELSE 'MISMATCH' END)
FROM r;

\echo
\echo '== Items per source, for enrolled patients (withheld: first rule that fails, in the order chart, date, privacy, share_when)'
\pset tuples_only off
\pset format aligned
SELECT source, kind,
	   count(*) FILTER (WHERE in_db) AS "rows",
	   count(*) FILTER (WHERE expected) AS shareable,
	   count(*) FILTER (WHERE on_portal) AS on_portal,
	   count(*) FILTER (WHERE in_db AND NOT chart_ok) AS "w:chart",
	   count(*) FILTER (WHERE in_db AND chart_ok AND NOT date_ok) AS "w:date",
	   count(*) FILTER (WHERE in_db AND chart_ok AND date_ok AND NOT privacy_ok) AS "w:privacy",
	   count(*) FILTER (WHERE in_db AND chart_ok AND date_ok AND privacy_ok AND NOT share_ok) AS "w:share_when"
FROM demo.cmp
WHERE enrolled OR (NOT in_db AND portal_patient IN (SELECT patient_id FROM portal_sync.enrollment))
GROUP BY source, kind
ORDER BY array_position('{patient,appointment,ccda,note,pin,insurance,clinical}', kind), source;
\pset tuples_only on
\pset format unaligned

SELECT format('  settings: date_cutoff %s, max_privacy_level %s; the portal holds %s items for %s patients',
			  s.date_cutoff, s.max_privacy_level, (SELECT count(*) FROM demo.portal_item),
			  (SELECT count(DISTINCT patient_id) FROM demo.portal_item))
FROM portal_sync.settings s;

\echo
\echo '== Insurance of patients who are not enrolled (pushed on every change)'
WITH t AS (
	SELECT i.shareable, p.key IS NOT NULL AS on_portal
	FROM demo.item i LEFT JOIN demo.portal_item p ON p.patient_id = i.patient_id AND p.source = i.source AND p.key = i.key
	WHERE i.pushed_insurance AND NOT i.enrolled),
gone AS (	-- changed rows no longer in the database (deleted) still on the portal
	SELECT count(*) AS n FROM demo.portal_item p JOIN demo.touched_insurance t
	  ON p.source = 'insurance' AND p.key = t.ins_id::text
	WHERE NOT EXISTS (SELECT 1 FROM demo.item i WHERE i.source = 'insurance' AND i.key = p.key)),
other AS (
	SELECT count(*) AS n FROM demo.portal_item p
	WHERE p.patient_id NOT IN (SELECT patient_id FROM portal_sync.enrollment)
	  AND NOT (p.source = 'insurance' AND p.key IN (SELECT ins_id::text FROM demo.touched_insurance WHERE NOT deleted)))
SELECT format(E'  %s rows changed for %s patients: %s shareable, on the portal %s; %s withheld (restricted chart), on the portal %s;\n'
			  '  %s deleted, left on the portal %s; other items of non-enrolled patients on the portal %s   %s',
			  (SELECT count(*) FROM demo.touched_insurance),
			  (SELECT count(DISTINCT patient_id) FROM demo.touched_insurance),
			  count(*) FILTER (WHERE shareable), count(*) FILTER (WHERE shareable AND on_portal),
			  count(*) FILTER (WHERE NOT shareable), count(*) FILTER (WHERE NOT shareable AND on_portal),
			  (SELECT count(*) FROM demo.touched_insurance WHERE deleted), gone.n, other.n,
			  CASE WHEN count(*) FILTER (WHERE shareable AND NOT on_portal) + count(*) FILTER (WHERE NOT shareable AND on_portal)
						+ gone.n + other.n = 0 THEN 'OK' ELSE 'MISMATCH' END)
FROM t, gone, other GROUP BY gone.n, other.n;

\echo
\echo '== Portal against database'
SELECT format('  every item on the portal is shareable and current: %s items; not in the database %s, '
			  'not shareable %s, of a non-enrolled patient (not pushed insurance) %s, stale data %s   %s',
			  count(*) FILTER (WHERE on_portal),
			  count(*) FILTER (WHERE on_portal AND NOT in_db),
			  count(*) FILTER (WHERE on_portal AND in_db AND NOT shareable),
			  count(*) FILTER (WHERE on_portal AND in_db AND shareable AND NOT expected),
			  count(*) FILTER (WHERE on_portal AND stale),
			  CASE WHEN count(*) FILTER (WHERE on_portal AND (NOT expected OR stale)) = 0 THEN 'OK' ELSE 'MISMATCH' END)
FROM demo.cmp;
SELECT format('  every shareable item of an enrolled patient is on the portal: %s expected, %s missing   %s',
			  count(*) FILTER (WHERE expected AND enrolled),
			  count(*) FILTER (WHERE expected AND enrolled AND NOT on_portal),
			  CASE WHEN count(*) FILTER (WHERE expected AND enrolled AND NOT on_portal) = 0 THEN 'OK' ELSE 'MISMATCH' END)
FROM demo.cmp;
-- A few examples of each kind of difference (ids only, no clinical data).
SELECT format('    e.g. %s patient %s %s/%s%s', what, patient_id, source, key, detail)
FROM (
	SELECT *, row_number() OVER (PARTITION BY what ORDER BY patient_id::int, source, key) AS rn FROM (
		SELECT CASE WHEN NOT in_db THEN 'on portal, not in db:'
					WHEN NOT shareable THEN 'on portal, not shareable:'
					WHEN NOT expected THEN 'on portal, patient not enrolled:'
					WHEN stale THEN 'stale on portal:'
					ELSE 'missing on portal:' END AS what,
			   patient_id, source, key,
			   CASE WHEN in_db AND NOT coalesce(shareable, true) THEN
					format(' (date %s, privacy %s, share_when %s, chart %s)', date_ok, privacy_ok, share_ok, chart_ok)
					ELSE '' END AS detail
		FROM demo.cmp
		WHERE (on_portal AND (NOT expected OR stale)) OR (expected AND NOT on_portal)) d
) x WHERE rn <= 3;
SELECT format('    stale columns: %s', string_agg(DISTINCT format('%s.%s', c.source, k), ', '))
FROM demo.cmp c
JOIN demo.item i ON i.patient_id = c.patient_id AND i.source = c.source AND i.key = c.key
JOIN demo.portal_item p ON p.patient_id = c.patient_id AND p.source = c.source AND p.key = c.key
CROSS JOIN LATERAL jsonb_object_keys(i.data) k
WHERE c.stale AND i.data -> k IS DISTINCT FROM p.data -> k
HAVING count(*) > 0;

SELECT format('  portal checks: %s requests, %s events applied, %s duplicates, %s non-2xx answers; violations: '
			  'protocol %s, order %s, ccda-before-snapshot %s, after-purge %s, snapshot %s   %s',
			  pg_temp.m('requests'), pg_temp.m('applied_event_ids'), pg_temp.m('duplicates'), pg_temp.m('non_2xx_answers'),
			  pg_temp.m('protocol_errors'), pg_temp.m('order_violations'), pg_temp.m('ccda_violations'),
			  pg_temp.m('purge_violations'), pg_temp.m('snapshot_violations'),
			  CASE WHEN pg_temp.m('protocol_errors') + pg_temp.m('order_violations') + pg_temp.m('ccda_violations')
						+ pg_temp.m('purge_violations') + pg_temp.m('snapshot_violations') = 0 THEN 'OK' ELSE 'MISMATCH' END);
SELECT format('  events applied by op: upsert %s, delete %s (of items never sent to the portal: %s%s), '
			  'snapshot_begin %s, snapshot_end %s, purge %s',
			  pg_temp.m('op_upsert'), pg_temp.m('op_delete'), pg_temp.m('delete_never_sent'),
			  (SELECT ' = ' || string_agg(format('%s %s', substr(name, 19), value), ' + ' ORDER BY value DESC)
				 FROM demo.portal_meta WHERE name LIKE 'delete_never_sent:%'),
			  pg_temp.m('op_snapshot_begin'), pg_temp.m('op_snapshot_end'), pg_temp.m('op_purge'));
