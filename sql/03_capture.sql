--
-- 03_capture: what the capture triggers queue (SPEC 1, 3; outbox grouping):
-- one outbox row per (statement, source, patient, op) holding the keys of
-- the rows changed; clinical and chart rows only for enrolled patients,
-- insurance always; NULL patients skipped and counted, never an error.
--
\set VERBOSITY default
\set SHOW_CONTEXT never

-- Charts for the whole suite.  Nobody is enrolled, so the chart inserts
-- queue nothing.
INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob, sex,
						 guardian_name, primary_provider)
SELECT g, 'MRN' || lpad(g::text, 6, '0'), 'Child' || g, 'Family' || (g % 7),
	   date '2015-01-01' + g * 37, (ARRAY['F', 'M'])[1 + g % 2],
	   'Parent' || g, 'Dr. Alvarez'
FROM generate_series(1, 60) g;
SELECT * FROM regress_util.new_events();

--
-- portal_sync.enroll(): a snapshot request (op 's', no source, no keys),
-- enrolled_by 'enroll()', true only the first time.
--
SELECT portal_sync.enroll('1');
SELECT portal_sync.enroll('1');
SELECT portal_sync.enroll('2');
SELECT portal_sync.enroll(NULL);
SELECT portal_sync.enroll('');
\echo :SQLSTATE
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.enrolled();

--
-- Clinical items: enrolled patients only.
--
INSERT INTO ehr.medication (med_id, patient_id, drug_name, dose, route, frequency, start_date)
VALUES (101, 1, 'amoxicillin', '400 mg/5 mL, 5 mL', 'oral', 'BID', '2026-01-10');
SELECT * FROM regress_util.new_events();
-- patient 3 is not enrolled: nothing
INSERT INTO ehr.medication (med_id, patient_id, drug_name, start_date)
VALUES (100, 3, 'cetirizine', '2026-01-10');
SELECT * FROM regress_util.new_events();

-- One multi-row statement: one outbox row per enrolled patient, with all
-- of that patient's keys.
INSERT INTO ehr.medication (med_id, patient_id, drug_name, start_date) VALUES
	(102, 1, 'ibuprofen', '2026-01-11'),
	(103, 1, 'albuterol HFA', '2026-01-11'),
	(105, 2, 'fluticasone', '2026-01-11'),
	(104, 1, 'acetaminophen', '2026-01-11'),
	(106, 2, 'montelukast', '2026-01-11'),
	(107, 3, 'polyethylene glycol', '2026-01-11');
SELECT * FROM regress_util.new_events();

UPDATE ehr.medication SET dose = 'as directed' WHERE med_id IN (102, 103, 105, 107);
SELECT * FROM regress_util.new_events();

-- A statement that changes no row queues nothing.
UPDATE ehr.medication SET dose = 'x' WHERE false;
DELETE FROM ehr.medication WHERE med_id = -1;
INSERT INTO ehr.medication (med_id, patient_id, drug_name) SELECT 1, 1, 'x' WHERE false;
SELECT * FROM regress_util.new_events();
-- Nor does one that leaves every value as it was (every column is sent);
-- only the rows it does change are queued.
UPDATE ehr.medication SET dose = dose, end_date = NULL;
UPDATE ehr.medication SET dose = 'as directed' WHERE med_id IN (102, 103, 105);
SELECT * FROM regress_util.new_events();
UPDATE ehr.medication SET dose = 'as directed' WHERE med_id IN (102, 105, 106);
SELECT * FROM regress_util.new_events();

-- Several statements in one transaction: one row per statement.
BEGIN;
UPDATE ehr.medication SET frequency = 'QD' WHERE med_id = 101;
UPDATE ehr.medication SET frequency = 'BID' WHERE med_id = 101;
COMMIT;
SELECT * FROM regress_util.new_events();

-- UPDATE moving a row to another patient: 'd' for the old patient, 'u' for
-- the new one, each only if enrolled.
UPDATE ehr.medication SET patient_id = 2 WHERE med_id = 104;   -- 1 -> 2
SELECT * FROM regress_util.new_events();
UPDATE ehr.medication SET patient_id = 3 WHERE med_id = 106;   -- 2 -> 3 (not enrolled)
SELECT * FROM regress_util.new_events();
UPDATE ehr.medication SET patient_id = 1 WHERE med_id = 107;   -- 3 (not enrolled) -> 1
SELECT * FROM regress_util.new_events();
-- one statement moving rows both ways and updating others in place
UPDATE ehr.medication SET patient_id = CASE patient_id WHEN 1 THEN 2 ELSE 1 END
WHERE med_id IN (101, 104, 105);
SELECT * FROM regress_util.new_events();
UPDATE ehr.medication SET patient_id = CASE patient_id WHEN 1 THEN 2 ELSE 1 END
WHERE med_id IN (101, 104, 105);
SELECT * FROM regress_util.new_events();

-- UPDATE changing the key: the old key must not stay on the portal, so it
-- is queued too.
UPDATE ehr.medication SET med_id = 1101 WHERE med_id = 101;
SELECT * FROM regress_util.new_events();

DELETE FROM ehr.medication WHERE med_id IN (102, 105, 106);   -- 1, 2, 3
SELECT * FROM regress_util.new_events();

-- INSERT ... ON CONFLICT DO UPDATE: the inserted and the updated keys.
INSERT INTO ehr.allergy (allergy_id, patient_id, allergen, reaction, severity)
VALUES (201, 1, 'peanut', 'hives', 'moderate');
SELECT * FROM regress_util.new_events();
INSERT INTO ehr.allergy (allergy_id, patient_id, allergen, reaction, severity)
VALUES (201, 1, 'peanut', 'anaphylaxis', 'severe'),
	   (202, 1, 'penicillin', 'rash', 'mild'),
	   (203, 3, 'latex', 'rash', 'mild')
ON CONFLICT (allergy_id) DO UPDATE SET reaction = excluded.reaction, severity = excluded.severity;
SELECT * FROM regress_util.new_events();
INSERT INTO ehr.allergy (allergy_id, patient_id, allergen)
VALUES (202, 1, 'penicillin') ON CONFLICT DO NOTHING;
SELECT * FROM regress_util.new_events();

-- MERGE: inserts, updates and deletes.
CREATE TEMP TABLE allergy_feed (allergy_id int, patient_id int, allergen text, status text);
INSERT INTO allergy_feed VALUES (201, 1, 'peanut', 'delete'), (202, 1, 'penicillin', 'inactive'),
	(204, 1, 'egg', 'active'), (205, 2, 'dust mite', 'active'), (206, 3, 'cat dander', 'active');
MERGE INTO ehr.allergy a USING allergy_feed f ON a.allergy_id = f.allergy_id
WHEN MATCHED AND f.status = 'delete' THEN DELETE
WHEN MATCHED THEN UPDATE SET status = f.status
WHEN NOT MATCHED THEN INSERT (allergy_id, patient_id, allergen, status)
	VALUES (f.allergy_id, f.patient_id, f.allergen, f.status);
SELECT * FROM regress_util.new_events();

-- COPY is an insert like any other.
COPY ehr.immunization (imm_id, patient_id, vaccine, cvx, dose_number, administered_on) FROM stdin;
301	1	DTaP	20	1	2026-01-05
302	1	IPV	10	1	2026-01-05
303	3	DTaP	20	1	2026-01-05
304	2	MMR	03	1	2026-01-06
\.
SELECT * FROM regress_util.new_events();

-- Data-modifying CTEs: each statement's rows.
WITH gone AS (DELETE FROM ehr.immunization WHERE imm_id = 302 RETURNING *)
INSERT INTO ehr.immunization (imm_id, patient_id, vaccine, cvx, dose_number, administered_on)
SELECT 305, patient_id, 'IPV', '10', 1, administered_on + 1 FROM gone;
SELECT * FROM regress_util.new_events();

-- Every attached clinical table captures.
INSERT INTO ehr.problem (problem_id, patient_id, description, icd10, onset_date)
VALUES (401, 1, 'Mild persistent asthma', 'J45.30', '2025-09-01'),
	   (402, 3, 'Eczema', 'L30.9', '2025-03-01');
INSERT INTO ehr.vital_sign (vital_id, patient_id, measured_at, height_cm, weight_kg, head_circ_cm, bmi)
VALUES (501, 1, '2026-01-05 09:30', 112.4, 19.8, NULL, 15.7),
	   (502, 2, '2026-01-06 10:00', 98.0, 15.1, 49.5, 15.7),
	   (503, 3, '2026-01-06 10:20', 75.2, 9.6, 45.0, 17.0);
INSERT INTO ehr.lab_result (result_id, patient_id, test_name, loinc, value, units, status, result_date)
VALUES (601, 1, 'Hemoglobin', '718-7', '12.1', 'g/dL', 'final', '2026-01-07'),
	   (602, 2, 'Lead, blood', '5671-3', '<1.0', 'ug/dL', 'preliminary', '2026-01-07');
SELECT * FROM regress_util.new_events();

-- A large statement: every key once, for the one patient, as inserts.
INSERT INTO ehr.vital_sign (vital_id, patient_id, measured_at, temp_c, pulse)
SELECT 10000 + g, 1, timestamp '2026-01-01' + g * interval '1 minute', 37.0, 100
FROM generate_series(1, 2000) g;
-- (The keys may be split over several outbox rows.)
SELECT patient_id, source, op, count(DISTINCT k) AS keys,
	   count(k) AS key_entries, min(k::int), max(k::int)
FROM regress_util.new_events() e, unnest(e.keys) k
GROUP BY patient_id, source, op;

--
-- Rolled back work leaves nothing.
--
BEGIN;
INSERT INTO ehr.medication (med_id, patient_id, drug_name) VALUES (120, 1, 'oseltamivir');
ROLLBACK;
BEGIN;
SAVEPOINT a;
INSERT INTO ehr.medication (med_id, patient_id, drug_name) VALUES (121, 1, 'oseltamivir');
ROLLBACK TO a;
INSERT INTO ehr.medication (med_id, patient_id, drug_name) VALUES (122, 2, 'cefdinir');
COMMIT;
SELECT * FROM regress_util.new_events();

--
-- Insurance: always queued, enrolled or not, and it enrolls nobody.
--
INSERT INTO ehr.insurance (ins_id, patient_id, payer, plan_name, member_id, effective_date)
VALUES (701, 3, 'Medicaid', 'CHIP', 'M0003', '2025-01-01'),
	   (702, 4, 'Aetna', 'PPO', 'A0004', '2025-01-01'),
	   (703, 4, 'Medicaid', 'Secondary', 'M0004', '2025-01-01'),
	   (704, 1, 'BCBS', 'HMO', 'B0001', '2025-01-01');
SELECT * FROM regress_util.new_events();
UPDATE ehr.insurance SET group_number = 'G1' WHERE ins_id IN (701, 702, 704);
SELECT * FROM regress_util.new_events();
UPDATE ehr.insurance SET patient_id = 5 WHERE ins_id = 703;   -- 4 -> 5, neither enrolled
SELECT * FROM regress_util.new_events();
DELETE FROM ehr.insurance WHERE ins_id IN (701, 702);
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.enrolled();

--
-- The chart (patient source): enrolled patients only.
--
UPDATE ehr.patient SET guardian_phone = '555-0100' WHERE patient_id IN (1, 2, 3);
SELECT * FROM regress_util.new_events();
UPDATE ehr.patient SET privacy_level = 2 WHERE patient_id = 2;
UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 2;
SELECT * FROM regress_util.new_events();
SELECT portal_sync.enroll('60');
INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob)
VALUES (61, 'MRN000061', 'New', 'Baby', '2026-01-02');
DELETE FROM ehr.patient WHERE patient_id IN (60, 61);
SELECT * FROM regress_util.new_events();

--
-- NULL patient: skipped and counted, never an error; the other rows of
-- the statement are queued as usual.
--
INSERT INTO ehr.lab_result (result_id, patient_id, test_name, status, result_date)
VALUES (610, NULL, 'Strep A rapid', 'final', '2026-01-08'),
	   (611, 1, 'Strep A rapid', 'final', '2026-01-08'),
	   (612, NULL, 'Urinalysis', 'preliminary', '2026-01-08');
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.skipped();
UPDATE ehr.lab_result SET status = 'final' WHERE result_id = 612;   -- still unmatched
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.skipped();
-- matching an unsolicited result to the chart of an enrolled patient
UPDATE ehr.lab_result SET patient_id = 1 WHERE result_id = 610;
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.skipped();
-- and unmatching it again
UPDATE ehr.lab_result SET patient_id = NULL WHERE result_id = 610;
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.skipped();
DELETE FROM ehr.lab_result WHERE result_id IN (610, 612);
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.skipped();
-- insurance with a NULL patient: skipped too
INSERT INTO ehr.insurance (ins_id, patient_id, payer, member_id) VALUES (705, NULL, 'Cigna', 'C0000');
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.skipped();
SELECT count(*) AS skipped_row_rows, sum(row_count) AS total FROM portal_sync.skipped_row;

--
-- TRUNCATE of an attached table: what the portal holds of it must go, for
-- every patient it was sent for.
--
TRUNCATE ehr.vital_sign;
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.enrolled();
-- insurance was sent for patients that are not enrolled (5 here) too
SELECT DISTINCT patient_id FROM ehr.insurance ORDER BY 1;
TRUNCATE ehr.insurance;
SELECT * FROM regress_util.new_events();
