--
-- A synthetic pediatric practice for test/demo.sh: about 2,000 patients aged
-- 0-18 with years of history in the reference schema (test/reference_schema.sql).
-- Loaded *before* portal_sync is attached, as in a practice that installs
-- it on an existing EHR.  Deterministic: one session, setseed(0.42).
--
-- psql variable: patients (default 2000).
--
\if :{?patients}
\else
\set patients 2000
\endif

SELECT setseed(0.42);

CREATE SCHEMA demo;

-- Per-patient draws used by every generator below (and by events.sql to
-- pick who has which initiating event).
CREATE TABLE demo.kid AS
SELECT g AS patient_id,
	   current_date - (1 + floor(random() * 18.9 * 365.25))::int AS dob,
	   CASE WHEN random() < 0.49 THEN 'F' ELSE 'M' END AS sex,
	   -- growth z-scores (Box-Muller), kept for life
	   sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()) AS z_ht,
	   sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()) AS z_wt,
	   sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()) AS z_hc,
	   random() AS r_asthma, random() AS r_adhd, random() AS r_psych,
	   random() AS r_allergy, random() AS r_rhinitis, random() AS r_eczema,
	   random() AS r_chart, random() AS r_event, random() AS r_ins,
	   (1 + floor(random() * 6))::int AS provider_no
FROM generate_series(1, :patients) g;
ALTER TABLE demo.kid ADD PRIMARY KEY (patient_id);
ALTER TABLE demo.kid ADD COLUMN age_y numeric;
UPDATE demo.kid SET age_y = (current_date - dob) / 365.25;

CREATE FUNCTION demo.pick(a text[]) RETURNS text LANGUAGE sql VOLATILE AS
$$ SELECT a[1 + floor(random() * array_length(a, 1))::int] $$;
-- Normal CDF (logistic approximation), as a percentile 0.1 .. 99.9.
CREATE FUNCTION demo.pct(z float8) RETURNS numeric LANGUAGE sql IMMUTABLE AS
$$ SELECT round(least(99.9, greatest(0.1, 100 / (1 + exp(-1.702 * z))))::numeric, 1) $$;
CREATE FUNCTION demo.provider(n int) RETURNS text LANGUAGE sql IMMUTABLE AS
$$ SELECT (ARRAY['Dr. Alvarez', 'Dr. Brooks', 'Dr. Chen', 'Dr. Dubois',
				 'Dr. Eze', 'Dr. Fischer'])[n] $$;

-- ------------------------------------------------------------ charts
INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, preferred_name,
						 dob, sex, guardian_name, guardian_phone, primary_provider,
						 privacy_level, created_at, updated_at)
SELECT k.patient_id,
	   'MRN' || lpad(k.patient_id::text, 7, '0'),
	   CASE k.sex
		 WHEN 'F' THEN demo.pick('{Olivia,Emma,Ava,Sophia,Isabella,Mia,Amelia,Harper,Evelyn,Abigail,Luna,Chloe,Zoe,Nora,Aaliyah,Maya,Priya,Fatima,Mei,Sofia}')
		 ELSE demo.pick('{Liam,Noah,Oliver,Elijah,James,William,Benjamin,Lucas,Henry,Mateo,Ethan,Jayden,Omar,Kai,Leo,Arjun,Santiago,Wei,Malik,Ezra}')
	   END,
	   ln.last,
	   CASE WHEN random() < 0.05 THEN demo.pick('{Bug,Junior,Bella,Sunny,Max}') END,
	   k.dob, k.sex,
	   demo.pick('{Maria,Jennifer,Aisha,Linda,Rosa,Sarah,Michael,David,Carlos,Kevin}') || ' ' || ln.last,
	   '555-' || lpad((floor(random() * 10000))::int::text, 4, '0'),
	   demo.provider(k.provider_no),
	   -- a few restricted charts (3-4), some at clinical-staff level (1)
	   CASE WHEN k.r_chart < 0.006 THEN 4 WHEN k.r_chart < 0.013 THEN 3
			WHEN k.r_chart < 0.05 THEN 1 ELSE 0 END,
	   k.dob::timestamptz + interval '2 days', now() - random() * interval '200 days'
FROM demo.kid k,
	 LATERAL (SELECT demo.pick('{Smith,Johnson,Garcia,Nguyen,Patel,Kim,Brown,Davis,Lopez,Wilson,Martinez,Anderson,Thomas,Moore,Jackson,Okafor,Cohen,Rossi,Haddad,Silva}') || '' AS last
			  WHERE k.patient_id IS NOT NULL) ln;

-- ------------------------------------------------------------ visits
-- Well-child visits on the AAP/Bright Futures schedule (age in days), plus
-- 0-4 sick visits per child.  Each visit: appointment, vitals, note.
CREATE TABLE demo.visit AS
SELECT k.patient_id, 'well_child'::text AS appt_type,
	   (k.dob + s.age_d + floor(random() * 10)::int)::timestamp
		 + make_interval(hours => 8 + floor(random() * 8)::int, mins => 15 * floor(random() * 4)::int) AS at,
	   demo.provider(CASE WHEN random() < 0.8 THEN k.provider_no ELSE 1 + floor(random() * 6)::int END) AS provider
FROM demo.kid k
CROSS JOIN unnest('{4,30,60,120,180,270,365,456,548,730,913,1095,1461,1826,2191,2557,2922,3287,3652,4018,4383,4748,5113,5479,5844,6209,6574}'::int[]) s(age_d)
WHERE k.dob + s.age_d + 10 < current_date
  AND random() < 0.93
UNION ALL
SELECT k.patient_id, 'sick',
	   (k.dob + 90 + floor(random() * greatest(1, current_date - k.dob - 91))::int)::timestamp
		 + make_interval(hours => 8 + floor(random() * 9)::int, mins => 15 * floor(random() * 4)::int),
	   demo.provider(1 + floor(random() * 6)::int)
FROM demo.kid k
CROSS JOIN generate_series(1, 4) n
WHERE current_date - k.dob > 100 AND random() < 0.45;
ALTER TABLE demo.visit ADD COLUMN visit_id serial;
ALTER TABLE demo.visit ADD COLUMN outcome text;
UPDATE demo.visit SET outcome = CASE WHEN random() < 0.04 THEN 'no_show'
									 WHEN random() < 0.04 THEN 'cancelled'
									 ELSE 'completed' END;

INSERT INTO ehr.appointment (patient_id, provider, location, appt_type, starts_at,
							 duration_min, status, reason, created_at)
SELECT v.patient_id, v.provider,
	   CASE WHEN random() < 0.7 THEN 'Main Office' ELSE 'Northside Clinic' END,
	   CASE WHEN v.appt_type = 'well_child' AND v.at::date - k.dob < 10 THEN 'newborn' ELSE v.appt_type END,
	   v.at, CASE v.appt_type WHEN 'well_child' THEN 30 ELSE 15 END,
	   v.outcome,
	   CASE v.appt_type WHEN 'well_child' THEN 'Well-child check'
			ELSE demo.pick('{Fever,Cough,Ear pain,Sore throat,Rash,Vomiting,Follow-up asthma,Injury}') END,
	   v.at - interval '14 days'
FROM demo.visit v JOIN demo.kid k USING (patient_id)
ORDER BY v.at;

-- Growth and vital signs at completed visits: smooth median curves scaled
-- by each child's own z-scores (plus a little noise), percentiles from z.
INSERT INTO ehr.vital_sign (patient_id, measured_at, height_cm, weight_kg, head_circ_cm,
							bmi, height_pct, weight_pct, head_circ_pct, bmi_pct,
							temp_c, pulse, resp_rate, bp_systolic, bp_diastolic)
SELECT patient_id, at, ht, wt, hc,
	   CASE WHEN a >= 2 THEN round((wt / (ht / 100) ^ 2)::numeric, 1) END,
	   demo.pct(zh), demo.pct(zw), CASE WHEN hc IS NOT NULL THEN demo.pct(zc) END,
	   CASE WHEN a >= 2 THEN demo.pct((zw - 0.6 * zh) / 0.8) END,
	   temp, pulse, rr,
	   CASE WHEN a >= 3 THEN 92 + floor(a * 1.5 + random() * 14)::int END,
	   CASE WHEN a >= 3 THEN 55 + floor(a * 0.8 + random() * 10)::int END
FROM (
	SELECT v.patient_id, v.at, x.a, x.zh, x.zw, x.zc,
		   round((x.ht_med * (1 + 0.04 * x.zh))::numeric, 1) AS ht,
		   round((x.wt_med * (1 + 0.12 * x.zw))::numeric, 3) AS wt,
		   CASE WHEN x.a < 3 THEN round((x.hc_med * (1 + 0.03 * x.zc))::numeric, 1) END AS hc,
		   round((CASE WHEN v.appt_type = 'sick' AND random() < 0.5 THEN 37.8 + random() * 1.8
					   ELSE 36.4 + random() * 0.8 END)::numeric, 1) AS temp,
		   (CASE WHEN x.a < 1 THEN 115 + random() * 35 WHEN x.a < 6 THEN 85 + random() * 30
				 WHEN x.a < 12 THEN 70 + random() * 30 ELSE 58 + random() * 30 END)::int AS pulse,
		   (CASE WHEN x.a < 1 THEN 30 + random() * 20 WHEN x.a < 6 THEN 22 + random() * 10
				 ELSE 14 + random() * 8 END)::int AS rr
	FROM demo.visit v JOIN demo.kid k USING (patient_id)
	CROSS JOIN LATERAL (
		SELECT a, zh, zw, zc,
			   CASE WHEN a < 1 THEN 50 + 25 * a
					WHEN a < 2 THEN 75 + 12 * (a - 1)
					WHEN a < 12 THEN 87 + 6.2 * (a - 2)
					WHEN k.sex = 'M' THEN 149 + 5.4 * least(a - 12, 5)
					ELSE 149 + 4.7 * least(a - 12, 3) END AS ht_med,
			   CASE WHEN a < 1 THEN 3.4 + 6.6 * a
					WHEN a < 2 THEN 10 + 2.4 * (a - 1)
					ELSE 12.4 + 2.3 * (a - 2) + 0.08 * (a - 2) ^ 2 END AS wt_med,
			   CASE WHEN a < 1 THEN 35 + 11 * sqrt(a) ELSE 46 + 1.5 * (a - 1) END AS hc_med
		FROM (SELECT ((v.at::date - k.dob) / 365.25)::float8 AS a,
					 k.z_ht + 0.25 * (random() - 0.5) AS zh,
					 k.z_wt + 0.35 * (random() - 0.5) AS zw,
					 k.z_hc + 0.25 * (random() - 0.5) AS zc) s
	) x
	WHERE v.outcome = 'completed'
) q;

INSERT INTO ehr.visit_note (patient_id, provider, note_type, visit_date, finalized,
							finalized_at, body)
SELECT v.patient_id, v.provider,
	   CASE v.appt_type WHEN 'well_child' THEN 'well_visit' ELSE 'encounter' END,
	   v.at::date, true, v.at + interval '5 hours',
	   CASE v.appt_type WHEN 'well_child'
			THEN 'Well-child visit. Growth and development reviewed. Anticipatory guidance given.'
			ELSE 'Acute visit. History, exam, assessment and plan documented.' END
FROM demo.visit v WHERE v.outcome = 'completed'
UNION ALL
-- phone and nurse notes: never initiating events
SELECT k.patient_id, demo.provider(k.provider_no),
	   CASE WHEN random() < 0.6 THEN 'phone' ELSE 'nurse' END,
	   current_date - floor(random() * least(current_date - k.dob, 1800))::int,
	   true, now() - random() * interval '3 years',
	   'Triage call: advice given, parent verbalized understanding.'
FROM demo.kid k CROSS JOIN generate_series(1, 2) WHERE random() < 0.35;

-- A C-CDA visit summary for some completed visits.
INSERT INTO ehr.ccda_document (patient_id, doc_type, created_at, document)
SELECT v.patient_id, 'visit_summary', v.at + interval '6 hours',
	   '<ClinicalDocument xmlns="urn:hl7-org:v3"><templateId root="2.16.840.1.113883.10.20.22.1.1"/>'
	   || '<title>Visit Summary</title><effectiveTime value="' || to_char(v.at, 'YYYYMMDDHH24MI') || '"/>'
	   || '<recordTarget><patientRole><id extension="' || v.patient_id || '"/></patientRole></recordTarget>'
	   || '</ClinicalDocument>'
FROM demo.visit v WHERE v.outcome = 'completed' AND random() < 0.12;

-- ------------------------------------------------------------ immunizations
-- CDC child and adolescent schedule: (vaccine, CVX, dose, age in days).
CREATE TABLE demo.cdc_schedule (vaccine text, cvx text, dose int, age_d int);
INSERT INTO demo.cdc_schedule VALUES
 ('Hepatitis B', '08', 1, 0), ('Hepatitis B', '08', 2, 30), ('Hepatitis B', '08', 3, 180),
 ('Rotavirus RV5', '116', 1, 60), ('Rotavirus RV5', '116', 2, 120), ('Rotavirus RV5', '116', 3, 180),
 ('DTaP', '20', 1, 60), ('DTaP', '20', 2, 120), ('DTaP', '20', 3, 180), ('DTaP', '20', 4, 456), ('DTaP', '20', 5, 1461),
 ('Hib (PRP-T)', '48', 1, 60), ('Hib (PRP-T)', '48', 2, 120), ('Hib (PRP-T)', '48', 3, 180), ('Hib (PRP-T)', '48', 4, 365),
 ('Pneumococcal conjugate PCV13', '133', 1, 60), ('Pneumococcal conjugate PCV13', '133', 2, 120),
 ('Pneumococcal conjugate PCV13', '133', 3, 180), ('Pneumococcal conjugate PCV13', '133', 4, 365),
 ('IPV', '10', 1, 60), ('IPV', '10', 2, 120), ('IPV', '10', 3, 180), ('IPV', '10', 4, 1461),
 ('MMR', '03', 1, 365), ('MMR', '03', 2, 1461),
 ('Varicella', '21', 1, 365), ('Varicella', '21', 2, 1461),
 ('Hepatitis A', '83', 1, 365), ('Hepatitis A', '83', 2, 548),
 ('Tdap', '115', 1, 4018),
 ('HPV 9-valent', '165', 1, 4018), ('HPV 9-valent', '165', 2, 4200),
 ('Meningococcal MenACWY', '114', 1, 4018), ('Meningococcal MenACWY', '114', 2, 5844);

INSERT INTO ehr.immunization (patient_id, vaccine, cvx, dose_number, administered_on,
							  lot_number, site, administered_by)
SELECT k.patient_id, s.vaccine, s.cvx, s.dose, d,
	   upper(substr(md5(random()::text), 1, 2)) || floor(random() * 90000 + 10000)::int,
	   CASE WHEN d - k.dob < 1095 THEN demo.pick('{"L thigh","R thigh"}')
			ELSE demo.pick('{"L deltoid","R deltoid"}') END,
	   demo.pick('{"RN Park","RN Ortiz","LPN Hughes","MA Quinn"}')
FROM demo.kid k
CROSS JOIN demo.cdc_schedule s
CROSS JOIN LATERAL (SELECT k.dob + s.age_d + floor(random() * 21)::int AS d) x
WHERE x.d <= current_date AND random() < 0.96
UNION ALL
-- seasonal influenza, each October from 6 months of age
SELECT k.patient_id, 'Influenza, injectable, quadrivalent', '150', NULL, x.d,
	   'FL' || floor(random() * 900000 + 100000)::int,
	   CASE WHEN x.d - k.dob < 1095 THEN 'L thigh' ELSE 'L deltoid' END, 'RN Park'
FROM demo.kid k
CROSS JOIN generate_series(0, 18) y
CROSS JOIN LATERAL (SELECT make_date(extract(year FROM current_date)::int - y, 10, 1)
						   + floor(random() * 45)::int AS d) x
WHERE x.d <= current_date AND x.d - k.dob >= 180 AND random() < 0.55;

-- ------------------------------------------------------------ problems
INSERT INTO ehr.problem (patient_id, description, icd10, onset_date, resolved_date,
						 status, noted_on, privacy_level)
SELECT patient_id, description, icd10, onset, resolved, status, onset, privacy
FROM (
	SELECT k.patient_id, 'Asthma, unspecified' AS description, 'J45.909' AS icd10,
		   k.dob + 730 + floor(random() * greatest(1, current_date - k.dob - 730))::int AS onset,
		   NULL::date AS resolved, 'active' AS status, 0 AS privacy
	FROM demo.kid k WHERE k.r_asthma < 0.10 AND k.age_y >= 2
	UNION ALL
	SELECT k.patient_id, 'ADHD, combined type', 'F90.2',
		   k.dob + 2190 + floor(random() * greatest(1, current_date - k.dob - 2190))::int,
		   NULL, 'active', 2
	FROM demo.kid k WHERE k.r_adhd < 0.09 AND k.age_y >= 6
	UNION ALL
	SELECT k.patient_id, CASE WHEN random() < 0.5 THEN 'Generalized anxiety disorder' ELSE 'Major depressive disorder, single episode' END,
		   CASE WHEN random() < 0.5 THEN 'F41.1' ELSE 'F32.A' END,
		   k.dob + 4380 + floor(random() * greatest(1, current_date - k.dob - 4380))::int,
		   NULL, 'active', 3
	FROM demo.kid k WHERE k.r_psych < 0.06 AND k.age_y >= 12
	UNION ALL
	SELECT k.patient_id, 'Atopic dermatitis', 'L20.9', k.dob + 60 + floor(random() * 400)::int,
		   NULL, CASE WHEN k.age_y > 5 THEN 'resolved' ELSE 'active' END, 0
	FROM demo.kid k WHERE k.r_eczema < 0.12 AND k.age_y >= 0.5
	UNION ALL
	SELECT k.patient_id, 'Allergic rhinitis', 'J30.9',
		   k.dob + 730 + floor(random() * greatest(1, current_date - k.dob - 730))::int,
		   NULL, 'active', 0
	FROM demo.kid k WHERE k.r_rhinitis < 0.12 AND k.age_y >= 2
	UNION ALL
	-- obesity: visible to clinical staff only (level 1)
	SELECT k.patient_id, 'Obesity, pediatric (BMI >= 95th percentile)', 'E66.9',
		   current_date - floor(random() * least(1500, current_date - k.dob - 730))::int,
		   NULL, 'active', 1
	FROM demo.kid k WHERE k.z_wt > 1.6 AND k.age_y >= 3
	UNION ALL
	SELECT v.patient_id, 'Acute otitis media', 'H66.90', v.at::date, v.at::date + 14, 'resolved', 0
	FROM demo.visit v WHERE v.appt_type = 'sick' AND v.outcome = 'completed' AND random() < 0.25
	UNION ALL
	SELECT k.patient_id, 'Streptococcal pharyngitis', 'J02.0', d, d + 10,
		   CASE WHEN random() < 0.15 THEN 'entered_in_error' ELSE 'resolved' END, 0
	FROM demo.kid k CROSS JOIN LATERAL (SELECT current_date - floor(random() * least(2000, current_date - k.dob))::int AS d) x
	WHERE k.age_y >= 3 AND random() < 0.15
) p;

-- ------------------------------------------------------------ allergies
INSERT INTO ehr.allergy (patient_id, allergen, reaction, severity, onset_date, status,
						 recorded_at, privacy_level)
SELECT k.patient_id, a.allergen, a.reaction, a.severity, d,
	   CASE WHEN random() < 0.05 THEN 'entered_in_error' WHEN random() < 0.08 THEN 'resolved' ELSE 'active' END,
	   d, 0
FROM demo.kid k
CROSS JOIN LATERAL (SELECT (ARRAY['Penicillin', 'Amoxicillin', 'Peanut', 'Egg', 'Tree nuts', 'Cow''s milk protein', 'Sulfonamides', 'Latex'])[1 + floor(random() * 8)::int] AS allergen) x
CROSS JOIN LATERAL (SELECT x.allergen,
						   CASE WHEN x.allergen IN ('Peanut', 'Tree nuts') THEN 'Anaphylaxis'
								WHEN x.allergen IN ('Penicillin', 'Amoxicillin', 'Sulfonamides') THEN 'Hives'
								ELSE 'Rash, GI upset' END AS reaction,
						   CASE WHEN x.allergen IN ('Peanut', 'Tree nuts') THEN 'severe'
								ELSE demo.pick('{mild,moderate}') END AS severity) a
CROSS JOIN LATERAL (SELECT k.dob + 180 + floor(random() * greatest(1, current_date - k.dob - 180))::int AS d) y
WHERE k.r_allergy < 0.16 AND k.age_y >= 0.5;

-- ------------------------------------------------------------ medications
INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dose, route, frequency,
							start_date, end_date, status, prescriber, privacy_level)
SELECT patient_id, drug, rxnorm, dose, route, freq, start_d,
	   end_d, CASE WHEN random() < 0.02 THEN 'entered_in_error'
				   WHEN end_d IS NOT NULL AND end_d < current_date THEN 'completed'
				   ELSE 'active' END,
	   prescriber, privacy
FROM (
	-- amoxicillin courses at sick visits
	SELECT v.patient_id, 'Amoxicillin 400 mg/5 mL oral suspension' AS drug, '308182' AS rxnorm,
		   '45 mg/kg/day' AS dose, 'oral' AS route, 'twice daily' AS freq,
		   v.at::date AS start_d, v.at::date + 10 AS end_d, v.provider AS prescriber, 0 AS privacy
	FROM demo.visit v WHERE v.appt_type = 'sick' AND v.outcome = 'completed' AND random() < 0.35
	UNION ALL
	SELECT k.patient_id, 'Albuterol HFA 90 mcg/actuation inhaler', '745679', '2 puffs', 'inhaled',
		   'every 4 hours as needed', current_date - floor(random() * least(1500, current_date - k.dob - 700))::int,
		   NULL, demo.provider(k.provider_no), 0
	FROM demo.kid k WHERE k.r_asthma < 0.10 AND k.age_y >= 2
	UNION ALL
	SELECT k.patient_id, 'Fluticasone HFA 44 mcg/actuation inhaler', '896188', '2 puffs', 'inhaled',
		   'twice daily', current_date - floor(random() * least(1200, current_date - k.dob - 700))::int,
		   NULL, demo.provider(k.provider_no), 0
	FROM demo.kid k WHERE k.r_asthma < 0.05 AND k.age_y >= 2
	UNION ALL
	SELECT k.patient_id, 'Cetirizine 5 mg/5 mL oral solution', '1014678', '5 mg', 'oral', 'once daily',
		   current_date - floor(random() * least(1500, current_date - k.dob - 700))::int,
		   NULL, demo.provider(k.provider_no), 0
	FROM demo.kid k WHERE k.r_rhinitis < 0.12 AND k.age_y >= 2
	UNION ALL
	SELECT k.patient_id, 'Hydrocortisone 2.5% cream', '106258', 'thin layer', 'topical', 'twice daily',
		   k.dob + 90 + floor(random() * 300)::int, k.dob + 400, demo.provider(k.provider_no), 0
	FROM demo.kid k WHERE k.r_eczema < 0.12 AND k.age_y >= 0.5
	UNION ALL
	-- ADHD stimulants: providers only (level 2)
	SELECT k.patient_id,
		   CASE WHEN random() < 0.6 THEN 'Methylphenidate ER 18 mg tablet' ELSE 'Lisdexamfetamine 30 mg capsule' END,
		   CASE WHEN random() < 0.6 THEN '1091170' ELSE '854832' END,
		   '1 tablet', 'oral', 'every morning',
		   current_date - floor(random() * least(2000, current_date - k.dob - 2190))::int,
		   NULL, demo.provider(k.provider_no), 2
	FROM demo.kid k WHERE k.r_adhd < 0.09 AND k.age_y >= 6
	UNION ALL
	-- SSRIs: physicians only (level 3)
	SELECT k.patient_id,
		   CASE WHEN random() < 0.5 THEN 'Sertraline 50 mg tablet' ELSE 'Fluoxetine 10 mg capsule' END,
		   CASE WHEN random() < 0.5 THEN '312940' ELSE '310384' END,
		   '1 tablet', 'oral', 'once daily',
		   current_date - floor(random() * least(1500, current_date - k.dob - 4380))::int,
		   NULL, demo.provider(k.provider_no), 3
	FROM demo.kid k WHERE k.r_psych < 0.06 AND k.age_y >= 12
	UNION ALL
	-- adolescent confidential care: physicians only (level 3)
	SELECT k.patient_id, 'Norethindrone 0.35 mg tablet', '198042', '1 tablet', 'oral', 'once daily',
		   current_date - floor(random() * 700)::int, NULL, demo.provider(k.provider_no), 3
	FROM demo.kid k WHERE k.sex = 'F' AND k.age_y >= 15 AND random() < 0.06
) m;

-- ------------------------------------------------------------ lab results
INSERT INTO ehr.lab_result (patient_id, order_number, test_name, loinc, value, units,
							reference_range, abnormal_flag, status, result_date, privacy_level)
SELECT patient_id, 'ORD' || lpad((floor(random() * 9999999))::int::text, 7, '0'),
	   test_name, loinc,
	   CASE WHEN st = 'cancelled' THEN NULL ELSE value END,
	   units, ref, CASE WHEN st = 'cancelled' THEN NULL ELSE flag END,
	   st, d, privacy
FROM (
	SELECT l.*, CASE WHEN r < 0.08 THEN 'preliminary' WHEN r < 0.85 THEN 'final'
					 WHEN r < 0.90 THEN 'corrected' ELSE 'cancelled' END AS st
	FROM (
		SELECT k.patient_id, 'Lead, blood' AS test_name, '5671-3' AS loinc,
			   CASE WHEN random() < 0.03 THEN '6.1' ELSE '<3.3' END AS value, 'ug/dL' AS units,
			   '<3.5' AS ref, 'N' AS flag, k.dob + s.age_d + floor(random() * 20)::int AS d,
			   0 AS privacy, random() AS r
		FROM demo.kid k CROSS JOIN unnest('{365,730}'::int[]) s(age_d)
		WHERE k.dob + s.age_d + 20 < current_date AND random() < 0.85
		UNION ALL
		SELECT k.patient_id, 'Hemoglobin', '718-7', round((10.5 + random() * 3)::numeric, 1)::text,
			   'g/dL', '11.0-13.5', NULL, k.dob + 365 + floor(random() * 20)::int, 0, random()
		FROM demo.kid k WHERE k.dob + 385 < current_date AND random() < 0.8
		UNION ALL
		SELECT k.patient_id, 'Cholesterol, total', '2093-3', (130 + floor(random() * 80))::int::text,
			   'mg/dL', '<170', NULL, k.dob + 3287 + floor(random() * 700)::int, 0, random()
		FROM demo.kid k WHERE k.dob + 4000 < current_date AND random() < 0.6
		UNION ALL
		SELECT v.patient_id, 'Strep A antigen, rapid', '78012-2',
			   CASE WHEN random() < 0.3 THEN 'Positive' ELSE 'Negative' END, NULL, 'Negative', NULL,
			   v.at::date, 0, random()
		FROM demo.visit v WHERE v.appt_type = 'sick' AND v.outcome = 'completed' AND random() < 0.3
		UNION ALL
		-- adolescent STI screening: physicians only (level 3)
		SELECT k.patient_id, 'Chlamydia trachomatis NAAT', '43304-5',
			   CASE WHEN random() < 0.05 THEN 'Detected' ELSE 'Not detected' END, NULL, 'Not detected', NULL,
			   current_date - floor(random() * 900)::int, 3, random()
		FROM demo.kid k WHERE k.age_y >= 15 AND random() < 0.2
		UNION ALL
		-- vitamin D panel: clinical staff (level 1)
		SELECT k.patient_id, 'Vitamin D, 25-hydroxy', '62292-8', (15 + floor(random() * 30))::int::text,
			   'ng/mL', '30-100', NULL, current_date - floor(random() * least(1500, current_date - k.dob))::int, 1, random()
		FROM demo.kid k WHERE random() < 0.08
	) l
) x;
UPDATE ehr.lab_result SET abnormal_flag = CASE WHEN value IN ('Positive', 'Detected', '6.1') THEN 'A' ELSE 'N' END
WHERE abnormal_flag IS NOT NULL OR (value IS NOT NULL AND loinc IN ('78012-2', '43304-5'));

-- ------------------------------------------------------------ insurance
INSERT INTO ehr.insurance (patient_id, coverage_rank, payer, plan_name, member_id, group_number,
						   subscriber_name, subscriber_relationship, effective_date)
SELECT k.patient_id, r.rank, p.payer, p.plan,
	   upper(substr(md5(random()::text), 1, 3)) || floor(random() * 900000000 + 100000000)::bigint,
	   CASE WHEN p.payer LIKE 'Medicaid%' THEN NULL ELSE 'G' || floor(random() * 90000 + 10000)::int END,
	   pt.guardian_name, 'parent',
	   greatest(k.dob, current_date - floor(random() * 2000)::int)
FROM demo.kid k
JOIN ehr.patient pt USING (patient_id)
CROSS JOIN LATERAL (SELECT 1 AS rank UNION ALL SELECT 2 WHERE k.r_ins < 0.15) r
CROSS JOIN LATERAL (
	SELECT (ARRAY['Medicaid (State Plan)', 'CHIP', 'Blue Cross Blue Shield', 'Aetna',
				  'UnitedHealthcare', 'Cigna', 'Kaiser Permanente', 'Humana'])[1 + floor(random() * 8)::int] AS payer,
		   demo.pick('{PPO,HMO,EPO,"Managed Care"}') AS plan
	WHERE r.rank IS NOT NULL) p;

-- Some old EHR-generated PINs (expired), before portal_sync.
INSERT INTO ehr.pin (patient_id, pin, generated_by, created_at, expires_at)
SELECT k.patient_id, lpad(floor(random() * 1000000)::int::text, 6, '0'), 'OP',
	   now() - interval '400 days' * random() - interval '40 days',
	   now() - interval '10 days'
FROM demo.kid k WHERE random() < 0.08;

ANALYZE;
