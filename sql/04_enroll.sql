--
-- 04_enroll: initiating events (SPEC 1, 3) and their non-events.  An
-- initiating event enrolls the patient (enrollment row, enrolled_by = the
-- source name) and queues a snapshot request (op 's') before the row's own
-- event.  Patients 10-59 are not enrolled before this file.
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT * FROM regress_util.new_events();

--
-- appointment: a new appointment row enrolls.
--
INSERT INTO ehr.appointment (appt_id, patient_id, provider, appt_type, starts_at)
VALUES (1001, 10, 'Dr. Alvarez', 'well_child', '2026-02-01 09:00-05');
SELECT * FROM regress_util.new_events();
-- already enrolled: just data
INSERT INTO ehr.appointment (appt_id, patient_id, provider, starts_at)
VALUES (1002, 10, 'Dr. Alvarez', '2026-03-01 09:00-05');
UPDATE ehr.appointment SET status = 'confirmed' WHERE appt_id = 1001;
SELECT * FROM regress_util.new_events();
-- several patients and rows in one statement: each enrolled once, snapshot
-- request first
INSERT INTO ehr.appointment (appt_id, patient_id, provider, starts_at) VALUES
	(1003, 11, 'Dr. Baker', '2026-02-02 10:00-05'),
	(1004, 12, 'Dr. Baker', '2026-02-02 10:15-05'),
	(1005, 11, 'Dr. Baker', '2026-02-09 10:00-05'),
	(1006, 10, 'Dr. Baker', '2026-02-09 10:15-05');
SELECT * FROM regress_util.new_events();
-- a NULL patient: skipped, nobody enrolled, no error
INSERT INTO ehr.appointment (appt_id, patient_id, provider, appt_type, starts_at)
VALUES (1007, NULL, 'Dr. Baker', 'sick', '2026-02-03 08:00-05');
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.skipped() WHERE source = 'appointment';
-- rolled back: not enrolled
BEGIN;
INSERT INTO ehr.appointment (appt_id, patient_id, provider, starts_at)
VALUES (1008, 13, 'Dr. Baker', '2026-02-03 08:15-05');
ROLLBACK;
SELECT * FROM regress_util.new_events();
SELECT count(*) AS enrolled_13 FROM portal_sync.patients WHERE patient_id = '13';
-- enrolled within the transaction: later statements of it are captured
BEGIN;
INSERT INTO ehr.medication (med_id, patient_id, drug_name) VALUES (140, 14, 'amoxicillin');
INSERT INTO ehr.appointment (appt_id, patient_id, provider, starts_at)
VALUES (1009, 14, 'Dr. Baker', '2026-02-03 08:30-05');
INSERT INTO ehr.medication (med_id, patient_id, drug_name) VALUES (141, 14, 'ibuprofen');
COMMIT;
SELECT * FROM regress_util.new_events();
-- moving an appointment from an enrolled patient to another one
UPDATE ehr.appointment SET patient_id = 15 WHERE appt_id = 1006;   -- 10 -> 15
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.enrolled();

--
-- Rows that predate the attach: an UPDATE that keeps satisfying
-- enroll_when is not an initiating event, one that starts satisfying it is.
--
SELECT portal_sync.detach('ehr.appointment');
SELECT portal_sync.detach('ehr.visit_note');
SELECT portal_sync.detach('ehr.pin');
INSERT INTO ehr.appointment (appt_id, patient_id, provider, starts_at)
VALUES (1016, 16, 'Dr. Chen', '2026-02-04 09:00-05');
INSERT INTO ehr.visit_note (note_id, patient_id, provider, note_type, visit_date, finalized, body) VALUES
	(2017, 17, 'Dr. Chen', 'encounter', '2025-12-01', true, 'Otitis media, left.'),
	(2018, 18, 'Dr. Chen', 'phone', '2025-12-02', true, 'Mother called re: fever.');
INSERT INTO ehr.pin (pin_id, patient_id, pin, generated_by) VALUES
	(3019, 19, '111-222', 'OP'),
	(3020, 20, '333-444', 'PORTAL');
SELECT portal_sync.attach('ehr.appointment', 'appointment', 'patient_id',
						  date_col => 'starts_at', privacy_col => 'privacy_level');
SELECT portal_sync.attach('ehr.visit_note', 'note', 'patient_id',
						  date_col => 'visit_date', privacy_col => 'privacy_level',
						  share_when => 'finalized',
						  enroll_when => 'finalized AND note_type IN (''encounter'', ''well_visit'')');
SELECT portal_sync.attach('ehr.pin', 'pin', 'patient_id',
						  enroll_when => 'generated_by = ''OP''');
SELECT * FROM regress_util.new_events();
-- true -> true: nothing (not enrolled, not an initiating event)
UPDATE ehr.appointment SET status = 'confirmed' WHERE appt_id = 1016;
UPDATE ehr.visit_note SET body = body || ' Addendum: improving.' WHERE note_id = 2017;
UPDATE ehr.pin SET expires_at = '2026-06-01' WHERE pin_id = 3019;
SELECT * FROM regress_util.new_events();
-- false -> true: enrolls
UPDATE ehr.visit_note SET note_type = 'encounter' WHERE note_id = 2018;
UPDATE ehr.pin SET generated_by = 'OP' WHERE pin_id = 3020;
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.enrolled();

--
-- note: a note *becoming* finalized (encounter / well visit) enrolls.
--
-- a draft encounter note: nothing
INSERT INTO ehr.visit_note (note_id, patient_id, provider, note_type, visit_date, body)
VALUES (2021, 21, 'Dr. Chen', 'encounter', '2026-01-15', 'Draft: cough x3 days');
UPDATE ehr.visit_note SET body = body || ', no fever' WHERE note_id = 2021;
SELECT * FROM regress_util.new_events();
-- finalized: enrolled by the note, snapshot request first
UPDATE ehr.visit_note SET finalized = true, finalized_at = '2026-01-15 17:00-05' WHERE note_id = 2021;
SELECT * FROM regress_util.new_events();
-- finalized twice (amended while finalized; un-finalized and re-finalized;
-- another note finalized): data only, no second enrollment or snapshot
UPDATE ehr.visit_note SET finalized_at = '2026-01-16 08:00-05' WHERE note_id = 2021;
UPDATE ehr.visit_note SET finalized = false WHERE note_id = 2021;
UPDATE ehr.visit_note SET finalized = true WHERE note_id = 2021;
INSERT INTO ehr.visit_note (note_id, patient_id, provider, note_type, visit_date, finalized)
VALUES (2022, 21, 'Dr. Chen', 'well_visit', '2026-01-20', true);
SELECT * FROM regress_util.new_events();
-- a non-encounter note finalized: nothing, however often
INSERT INTO ehr.visit_note (note_id, patient_id, provider, note_type, visit_date, body)
VALUES (2023, 23, 'RN Diaz', 'phone', '2026-01-15', 'Refill request');
UPDATE ehr.visit_note SET finalized = true WHERE note_id = 2023;
UPDATE ehr.visit_note SET body = 'Refill request, sent to pharmacy' WHERE note_id = 2023;
INSERT INTO ehr.visit_note (note_id, patient_id, provider, note_type, visit_date, finalized) VALUES
	(2024, 23, 'RN Diaz', 'nurse', '2026-01-15', true),
	(2025, 23, 'RN Diaz', 'portal_message', '2026-01-15', true);
SELECT * FROM regress_util.new_events();
-- inserted already finalized: enrolls
INSERT INTO ehr.visit_note (note_id, patient_id, provider, note_type, visit_date, finalized)
VALUES (2026, 26, 'Dr. Chen', 'well_visit', '2026-01-21', true);
SELECT * FROM regress_util.new_events();
-- one statement, a draft and a finalized encounter note of one patient: one
-- enrollment, one row with both keys
INSERT INTO ehr.visit_note (note_id, patient_id, provider, note_type, visit_date, finalized) VALUES
	(2027, 27, 'Dr. Chen', 'encounter', '2026-01-22', false),
	(2028, 27, 'Dr. Chen', 'encounter', '2026-01-21', true);
SELECT * FROM regress_util.new_events();
-- several notes of several patients finalized by one statement
INSERT INTO ehr.visit_note (note_id, patient_id, provider, note_type, visit_date) VALUES
	(2029, 29, 'Dr. Chen', 'encounter', '2026-01-23'),
	(2030, 30, 'Dr. Chen', 'phone', '2026-01-23'),
	(2031, 29, 'Dr. Chen', 'well_visit', '2026-01-23');
UPDATE ehr.visit_note SET finalized = true WHERE note_id IN (2029, 2030, 2031);
SELECT * FROM regress_util.new_events();

--
-- ccda: a C-CDA row inserted enrolls.
--
INSERT INTO ehr.ccda_document (doc_id, patient_id, doc_type, document)
VALUES (4032, 32, 'visit_summary', '<ClinicalDocument/>');
SELECT * FROM regress_util.new_events();
-- an imported document not matched to a chart: skipped
INSERT INTO ehr.ccda_document (doc_id, patient_id, doc_type, document)
VALUES (4033, NULL, 'imported', '<ClinicalDocument/>');
SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.skipped() WHERE source = 'ccda';

--
-- pin: a PIN generated from the EHR enrolls, one generated by the portal
-- does not.
--
INSERT INTO ehr.pin (pin_id, patient_id, pin, generated_by) VALUES (3034, 34, '555-666', 'OP');
SELECT * FROM regress_util.new_events();
INSERT INTO ehr.pin (pin_id, patient_id, pin, generated_by) VALUES (3035, 35, '777-888', 'PORTAL');
UPDATE ehr.pin SET expires_at = '2026-06-01' WHERE pin_id = 3035;
SELECT * FROM regress_util.new_events();
-- a portal PIN for an enrolled patient is data
INSERT INTO ehr.pin (pin_id, patient_id, pin, generated_by) VALUES (3036, 34, '999-000', 'PORTAL');
SELECT * FROM regress_util.new_events();

--
-- Not initiating events: insurance, clinical items, the chart.
--
INSERT INTO ehr.insurance (ins_id, patient_id, payer, member_id) VALUES (737, 37, 'Aetna', 'A0037');
INSERT INTO ehr.medication (med_id, patient_id, drug_name) VALUES (138, 38, 'amoxicillin');
INSERT INTO ehr.lab_result (result_id, patient_id, test_name, status, result_date)
VALUES (638, 38, 'CBC', 'final', '2026-01-09');
UPDATE ehr.patient SET guardian_phone = '555-0138' WHERE patient_id = 38;
SELECT * FROM regress_util.new_events();
SELECT count(*) AS enrolled_37_38 FROM portal_sync.patients WHERE patient_id IN ('37', '38');

--
-- enroll() for a patient enrolled by an event: false, nothing queued.
--
SELECT portal_sync.enroll('10');
SELECT * FROM regress_util.new_events();

--
-- Re-attaching with another enroll_when takes effect at once.
--
SELECT portal_sync.attach('ehr.pin', 'pin', 'patient_id', enroll_when => 'generated_by = ''PORTAL''');
INSERT INTO ehr.pin (pin_id, patient_id, pin, generated_by) VALUES
	(3039, 39, '121-212', 'PORTAL'),
	(3040, 40, '343-434', 'OP');
SELECT * FROM regress_util.new_events();
SELECT portal_sync.attach('ehr.pin', 'pin', 'patient_id', enroll_when => 'generated_by = ''OP''');
INSERT INTO ehr.pin (pin_id, patient_id, pin, generated_by) VALUES (3041, 41, '565-656', 'PORTAL');
SELECT * FROM regress_util.new_events();

-- enroll_when NULL (unknown) does not enroll.
SELECT portal_sync.attach('ehr.appointment', 'appointment', 'patient_id',
						  date_col => 'starts_at', privacy_col => 'privacy_level',
						  enroll_when => 'reason <> ''admin''');
INSERT INTO ehr.appointment (appt_id, patient_id, provider, starts_at, reason)
VALUES (1042, 42, 'Dr. Chen', '2026-02-05 09:00-05', NULL),
	   (1043, 43, 'Dr. Chen', '2026-02-05 09:15-05', 'admin'),
	   (1044, 44, 'Dr. Chen', '2026-02-05 09:30-05', 'fever');
SELECT * FROM regress_util.new_events();
SELECT portal_sync.attach('ehr.appointment', 'appointment', 'patient_id',
						  date_col => 'starts_at', privacy_col => 'privacy_level');

SELECT * FROM regress_util.enrolled();
SELECT name, source, kind, enroll_when FROM portal_sync.sources
WHERE kind IN ('appointment', 'ccda', 'note', 'pin') ORDER BY name;

-- unenroll(): an enrolled (or requested) patient gets an unenrollment
-- request ('x'); for a patient never enrolled it returns false.
SELECT portal_sync.unenroll('44');
SELECT portal_sync.unenroll('999');
SELECT * FROM regress_util.new_events();
SELECT portal_sync.unenroll('');

-- Ids given to the functions are read as values of the chart's patient
-- column (integer here): ' 0061' names patient 61; a text that is no
-- integer is refused.
SELECT portal_sync.enroll(' 0061');
SELECT patient_id FROM portal_sync.patients WHERE patient_id IN ('61', ' 0061');
SELECT portal_sync.enroll('B1EEBC99');
SELECT * FROM regress_util.new_events();
