--
-- test/demo.sh, step 1 after attaching: the initiating events of a busy
-- week, as the EHR would write them (front desk, providers signing notes,
-- the C-CDA generator, the portal's own PIN sync, the eligibility batch).
-- Who gets which event is drawn from demo.kid.r_event (fixed seed).
-- Every event is logged in demo.event, the demo's own record of what it
-- did, to check enrollment against.
--
SELECT setseed(0.43);

CREATE TABLE demo.event (
	n			serial,
	patient_id	int NOT NULL,
	event		text NOT NULL,		-- appointment | ccda | note_enrolling | note_other | pin_op | pin_portal | insurance
	enrolls		boolean NOT NULL,
	row_key		bigint
);
CREATE TABLE demo.touched_insurance (ins_id bigint PRIMARY KEY, patient_id int, deleted boolean NOT NULL DEFAULT false);

-- Front desk: appointments scheduled one by one (one transaction each).
CREATE TEMP TABLE appt_plan AS
SELECT k.patient_id, demo.provider(k.provider_no) AS provider,
	   (current_date + 1 + floor(random() * 60)::int)::timestamp
		 + make_interval(hours => 8 + floor(random() * 8)::int, mins => 15 * floor(random() * 4)::int) AS at,
	   CASE WHEN random() < 0.5 THEN 'well_child' WHEN random() < 0.6 THEN 'sick' ELSE 'follow_up' END AS appt_type
FROM demo.kid k WHERE k.r_event < 0.20 ORDER BY random();
DO $$
DECLARE r record; id bigint;
BEGIN
	FOR r IN SELECT * FROM appt_plan LOOP
		INSERT INTO ehr.appointment (patient_id, provider, appt_type, starts_at, duration_min, status, reason)
		VALUES (r.patient_id, r.provider, r.appt_type, r.at,
				CASE r.appt_type WHEN 'well_child' THEN 30 ELSE 15 END, 'scheduled',
				CASE r.appt_type WHEN 'well_child' THEN 'Well-child check' WHEN 'sick' THEN 'Cough and fever'
					 ELSE 'Follow-up' END)
		RETURNING appt_id INTO id;
		INSERT INTO demo.event (patient_id, event, enrolls, row_key) VALUES (r.patient_id, 'appointment', true, id);
		COMMIT;
	END LOOP;
END
$$;

-- The C-CDA generator: transition-of-care and referral documents in one
-- batch, for a new group of patients and for some just scheduled ones
-- (their document must wait for their snapshot), plus one imported
-- document not yet matched to a chart (patient NULL: skipped, counted).
WITH ins AS (
	INSERT INTO ehr.ccda_document (patient_id, doc_type, document)
	SELECT k.patient_id, CASE WHEN random() < 0.6 THEN 'transition_of_care' ELSE 'referral' END,
		   '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>Transition of Care</title>'
		   || '<recordTarget><patientRole><id extension="' || k.patient_id || '"/></patientRole></recordTarget>'
		   || '<component><structuredBody>' || repeat('<section><text>problem, medication, allergy and immunization lists</text></section>', 20)
		   || '</structuredBody></component></ClinicalDocument>'
	FROM demo.kid k WHERE (k.r_event >= 0.20 AND k.r_event < 0.28) OR k.r_event < 0.03
	UNION ALL
	SELECT NULL, 'imported', '<ClinicalDocument><title>Outside records</title></ClinicalDocument>'
	RETURNING doc_id, patient_id)
INSERT INTO demo.event (patient_id, event, enrolls, row_key)
SELECT patient_id, 'ccda', true, doc_id FROM ins WHERE patient_id IS NOT NULL;

-- Providers write notes (drafts, one statement), then sign them one by one.
-- Only finalized encounter and well-visit notes enroll; phone and nurse
-- notes, and drafts left unsigned, do not.
CREATE TEMP TABLE note_plan AS
SELECT k.patient_id, demo.provider(k.provider_no) AS provider,
	   CASE WHEN random() < 0.35 THEN 'encounter' WHEN random() < 0.45 THEN 'well_visit'
			WHEN random() < 0.6 THEN 'phone' ELSE 'nurse' END AS note_type,
	   random() < 0.85 AS will_sign
FROM demo.kid k WHERE k.r_event >= 0.28 AND k.r_event < 0.42;
INSERT INTO ehr.visit_note (patient_id, provider, note_type, visit_date, body)
SELECT patient_id, provider, note_type, current_date - floor(random() * 3)::int,
	   'Draft: ' || note_type || ' note.' FROM note_plan;
CREATE TEMP TABLE to_sign AS
SELECT n.note_id, n.patient_id, n.note_type
FROM ehr.visit_note n JOIN note_plan p USING (patient_id)
WHERE NOT n.finalized AND p.will_sign ORDER BY random();
DO $$
DECLARE r record;
BEGIN
	FOR r IN SELECT * FROM to_sign LOOP
		UPDATE ehr.visit_note SET finalized = true, finalized_at = now(),
			   body = replace(body, 'Draft: ', 'Signed: ')
		WHERE note_id = r.note_id;
		INSERT INTO demo.event (patient_id, event, enrolls, row_key)
		VALUES (r.patient_id, CASE WHEN r.note_type IN ('encounter', 'well_visit') THEN 'note_enrolling' ELSE 'note_other' END,
				r.note_type IN ('encounter', 'well_visit'), r.note_id);
		COMMIT;
	END LOOP;
END
$$;

-- Front desk hands out portal PINs generated in the EHR ('OP'), one by one.
DO $$
DECLARE r record; id bigint;
BEGIN
	FOR r IN SELECT patient_id FROM demo.kid WHERE r_event >= 0.42 AND r_event < 0.52 ORDER BY patient_id LOOP
		INSERT INTO ehr.pin (patient_id, pin, generated_by, expires_at)
		VALUES (r.patient_id, lpad(floor(random() * 1000000)::int::text, 6, '0'), 'OP', now() + interval '30 days')
		RETURNING pin_id INTO id;
		INSERT INTO demo.event (patient_id, event, enrolls, row_key) VALUES (r.patient_id, 'pin_op', true, id);
		COMMIT;
	END LOOP;
END
$$;

-- The portal's self sign-up PINs synced back into the EHR ('PORTAL'): must
-- not enroll.
WITH ins AS (
	INSERT INTO ehr.pin (patient_id, pin, generated_by, expires_at)
	SELECT patient_id, lpad(floor(random() * 1000000)::int::text, 6, '0'), 'PORTAL', now() + interval '30 days'
	FROM demo.kid WHERE r_event >= 0.52 AND r_event < 0.57
	RETURNING pin_id, patient_id)
INSERT INTO demo.event (patient_id, event, enrolls, row_key)
SELECT patient_id, 'pin_portal', false, pin_id FROM ins;

-- The eligibility batch, for patients who are not enrolled: payer changes,
-- new secondary coverage, terminations, one coverage deleted, and new
-- coverage for two restricted charts (their insurance must not be shared).
CREATE TEMP TABLE ins_pts AS
SELECT k.patient_id FROM demo.kid k
WHERE ((k.r_event >= 0.57 AND k.r_event < 0.65)
	   OR k.patient_id IN (SELECT patient_id FROM ehr.patient WHERE privacy_level >= 3
						   AND patient_id NOT IN (SELECT patient_id::int FROM portal_sync.enrollment)
						   ORDER BY patient_id LIMIT 2))
  AND k.patient_id NOT IN (SELECT patient_id::int FROM portal_sync.enrollment);
WITH upd AS (
	UPDATE ehr.insurance i SET payer = 'Medicaid (State Plan)', plan_name = 'Managed Care',
		   group_number = NULL, effective_date = date_trunc('month', current_date)::date
	FROM ins_pts p WHERE i.patient_id = p.patient_id AND i.coverage_rank = 1 AND p.patient_id % 3 = 0
	RETURNING i.ins_id, i.patient_id)
INSERT INTO demo.touched_insurance SELECT ins_id, patient_id FROM upd;
WITH upd AS (
	UPDATE ehr.insurance i SET termination_date = current_date + 30
	FROM ins_pts p WHERE i.patient_id = p.patient_id AND p.patient_id % 3 = 1
	RETURNING i.ins_id, i.patient_id)
INSERT INTO demo.touched_insurance SELECT ins_id, patient_id FROM upd ON CONFLICT DO NOTHING;
WITH ins AS (
	INSERT INTO ehr.insurance (patient_id, coverage_rank, payer, plan_name, member_id, subscriber_name,
							   subscriber_relationship, effective_date)
	SELECT p.patient_id, 2, 'Aetna', 'PPO', 'W' || (100000000 + p.patient_id * 7919), 'Guardian of ' || p.patient_id,
		   'guardian', current_date
	FROM ins_pts p
	WHERE (p.patient_id % 3 = 2 AND NOT EXISTS (SELECT 1 FROM ehr.insurance i WHERE i.patient_id = p.patient_id AND i.coverage_rank = 2))
	   OR p.patient_id IN (SELECT patient_id FROM ehr.patient WHERE privacy_level >= 3)
	RETURNING ins_id, patient_id)
INSERT INTO demo.touched_insurance SELECT ins_id, patient_id FROM ins;
WITH del AS (
	DELETE FROM ehr.insurance WHERE ins_id = (
		SELECT min(i.ins_id) FROM ehr.insurance i JOIN ins_pts p USING (patient_id)
		WHERE i.coverage_rank = 2 AND i.ins_id NOT IN (SELECT ins_id FROM demo.touched_insurance))
	RETURNING ins_id, patient_id)
INSERT INTO demo.touched_insurance SELECT ins_id, patient_id, true FROM del;
INSERT INTO demo.event (patient_id, event, enrolls, row_key)
SELECT patient_id, 'insurance', false, ins_id FROM demo.touched_insurance;

-- An unsolicited lab result the interface could not match (patient NULL).
INSERT INTO ehr.lab_result (patient_id, test_name, loinc, value, units, status, result_date)
VALUES (NULL, 'Bilirubin, total', '1975-2', '0.6', 'mg/dL', 'final', current_date);
