--
-- test/demo.sh, step 2: ordinary days after enrollment.  Incremental
-- changes, mostly for enrolled patients (they must reach the portal as
-- upserts, deletes or a purge), some for patients who are not enrolled
-- (they must not).  Each change is one transaction; counts go to
-- demo.change for the summary.
--
SELECT setseed(0.44);

CREATE TABLE demo.change (what text, n bigint);
CREATE TEMP TABLE enrolled AS
SELECT patient_id::int AS patient_id FROM portal_sync.enrollment ORDER BY 1;
CREATE TEMP TABLE restricted_before AS
SELECT patient_id FROM ehr.patient JOIN enrolled USING (patient_id) WHERE privacy_level >= 3;

-- Sick visits today: new vitals for some enrolled and some non-enrolled patients.
WITH ins AS (
	INSERT INTO ehr.vital_sign (patient_id, measured_at, weight_kg, temp_c, pulse, resp_rate)
	SELECT k.patient_id, localtimestamp(0) - random() * interval '3 hours',
		   round((3.4 + 4 * least(k.age_y, 15))::numeric, 3), round((37.5 + random() * 2)::numeric, 1),
		   (80 + random() * 40)::int, (16 + random() * 12)::int
	FROM (SELECT * FROM demo.kid ORDER BY patient_id) k
	WHERE (k.patient_id IN (SELECT patient_id FROM enrolled) AND random() < 0.12)
	   OR (k.patient_id NOT IN (SELECT patient_id FROM enrolled) AND random() < 0.05)
	RETURNING patient_id)
INSERT INTO demo.change
SELECT 'new vitals (enrolled)', count(*) FILTER (WHERE patient_id IN (SELECT patient_id FROM enrolled)) FROM ins
UNION ALL
SELECT 'new vitals (not enrolled)', count(*) FILTER (WHERE patient_id NOT IN (SELECT patient_id FROM enrolled)) FROM ins;

-- Flu shots given today to enrolled patients.
WITH ins AS (
	INSERT INTO ehr.immunization (patient_id, vaccine, cvx, administered_on, lot_number, site, administered_by)
	SELECT patient_id, 'Influenza, injectable, quadrivalent', '150', current_date, 'FL2026A', 'L deltoid', 'RN Park'
	FROM enrolled WHERE random() < 0.06
	RETURNING 1)
INSERT INTO demo.change SELECT 'flu shots (enrolled)', count(*) FROM ins;

-- A provider raises the privacy of medications (e.g. a psych referral):
-- the portal must drop them.
WITH upd AS (
	UPDATE ehr.medication SET privacy_level = 3
	WHERE med_id IN (SELECT m.med_id FROM ehr.medication m JOIN enrolled USING (patient_id)
					 WHERE m.privacy_level = 0 AND m.status = 'active'
					   AND m.start_date >= current_date - interval '3 years'
					 ORDER BY m.med_id LIMIT 12)
	RETURNING 1)
INSERT INTO demo.change SELECT 'medication privacy raised to 3', count(*) FROM upd;

-- Medications entered in error.
WITH upd AS (
	UPDATE ehr.medication SET status = 'entered_in_error'
	WHERE med_id IN (SELECT m.med_id FROM ehr.medication m JOIN enrolled USING (patient_id)
					 WHERE m.status = 'active' AND m.privacy_level = 0 ORDER BY m.med_id DESC LIMIT 5)
	RETURNING 1)
INSERT INTO demo.change SELECT 'medication entered in error', count(*) FROM upd;

-- The lab corrects results, finalizes preliminary ones, cancels some.
WITH upd AS (
	UPDATE ehr.lab_result SET status = 'corrected', value = CASE WHEN value ~ '^[0-9.]+$' THEN (value::numeric + 1)::text ELSE value END
	WHERE result_id IN (SELECT l.result_id FROM ehr.lab_result l JOIN enrolled USING (patient_id)
						WHERE l.status = 'final' AND l.privacy_level = 0
						  AND l.result_date >= current_date - interval '3 years'
						ORDER BY l.result_id LIMIT 20)
	RETURNING 1)
INSERT INTO demo.change SELECT 'lab result corrected', count(*) FROM upd;
WITH upd AS (
	UPDATE ehr.lab_result SET status = 'final'
	WHERE result_id IN (SELECT l.result_id FROM ehr.lab_result l JOIN enrolled USING (patient_id)
						WHERE l.status = 'preliminary' AND l.result_date >= current_date - interval '3 years'
						ORDER BY l.result_id LIMIT 20)
	RETURNING 1)
INSERT INTO demo.change SELECT 'lab result preliminary -> final', count(*) FROM upd;
WITH upd AS (
	UPDATE ehr.lab_result SET status = 'cancelled', value = NULL, abnormal_flag = NULL
	WHERE result_id IN (SELECT l.result_id FROM ehr.lab_result l JOIN enrolled USING (patient_id)
						WHERE l.status = 'final' AND l.result_date >= current_date - interval '3 years'
						ORDER BY l.result_id DESC LIMIT 5)
	RETURNING 1)
INSERT INTO demo.change SELECT 'lab result cancelled', count(*) FROM upd;
-- A result date corrected to years ago: now before the cutoff.
WITH upd AS (
	UPDATE ehr.lab_result SET result_date = result_date - interval '5 years'
	WHERE result_id IN (SELECT l.result_id FROM ehr.lab_result l JOIN enrolled USING (patient_id)
						WHERE l.status = 'final' AND l.result_date >= current_date - interval '1 year'
						ORDER BY l.result_id LIMIT 3)
	RETURNING 1)
INSERT INTO demo.change SELECT 'lab result moved before the cutoff', count(*) FROM upd;

-- Immunizations recorded on the wrong chart, deleted.
WITH del AS (
	DELETE FROM ehr.immunization
	WHERE imm_id IN (SELECT i.imm_id FROM ehr.immunization i JOIN enrolled USING (patient_id)
					 WHERE i.administered_on >= current_date - interval '2 years' ORDER BY i.imm_id LIMIT 3)
	RETURNING 1)
INSERT INTO demo.change SELECT 'immunization deleted', count(*) FROM del;

-- Appointments cancelled by families.
WITH upd AS (
	UPDATE ehr.appointment SET status = 'cancelled'
	WHERE appt_id IN (SELECT a.appt_id FROM ehr.appointment a JOIN enrolled USING (patient_id)
					  WHERE a.status = 'scheduled' ORDER BY a.appt_id LIMIT 10)
	RETURNING 1)
INSERT INTO demo.change SELECT 'appointment cancelled', count(*) FROM upd;

-- New problems (one at level 2: withheld).
WITH ins AS (
	INSERT INTO ehr.problem (patient_id, description, icd10, onset_date, status, privacy_level)
	SELECT patient_id, CASE WHEN patient_id % 5 = 0 THEN 'ADHD, predominantly inattentive type' ELSE 'Acute otitis media' END,
		   CASE WHEN patient_id % 5 = 0 THEN 'F90.0' ELSE 'H66.90' END, current_date, 'active',
		   CASE WHEN patient_id % 5 = 0 THEN 2 ELSE 0 END
	FROM enrolled WHERE random() < 0.04
	RETURNING 1)
INSERT INTO demo.change SELECT 'new problem', count(*) FROM ins;

-- Charts restricted (privacy 4): one purge each, nothing more.
WITH upd AS (
	UPDATE ehr.patient SET privacy_level = 4, updated_at = now()
	WHERE patient_id IN (SELECT p.patient_id FROM ehr.patient p JOIN enrolled USING (patient_id)
						 WHERE p.privacy_level = 0 ORDER BY p.patient_id LIMIT 3)
	RETURNING 1)
INSERT INTO demo.change SELECT 'chart restricted', count(*) FROM upd;
-- A restricted chart opened again (privacy 0): a new snapshot.
WITH upd AS (
	UPDATE ehr.patient SET privacy_level = 0, updated_at = now()
	WHERE patient_id = (SELECT min(patient_id) FROM restricted_before)
	RETURNING 1)
INSERT INTO demo.change SELECT 'chart unrestricted', count(*) FROM upd;

-- Insurance of enrolled patients updated too.
WITH upd AS (
	UPDATE ehr.insurance SET plan_name = 'HMO', group_number = 'G77777'
	WHERE ins_id IN (SELECT i.ins_id FROM ehr.insurance i JOIN enrolled USING (patient_id)
					 ORDER BY i.ins_id LIMIT 10)
	RETURNING 1)
INSERT INTO demo.change SELECT 'insurance updated (enrolled)', count(*) FROM upd;
