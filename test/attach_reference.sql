--
-- Attaches the tables of test/reference_schema.sql to portal_sync, the way
-- a pediatric practice would.  Needs CREATE EXTENSION portal_sync first.
--
-- The chart: its privacy column is the chart-level privacy.
SELECT portal_sync.attach('ehr.patient', 'patient', 'patient_id',
						  privacy_col => 'privacy_level');

-- Initiating events.
SELECT portal_sync.attach('ehr.appointment', 'appointment', 'patient_id',
						  date_col => 'starts_at',
						  privacy_col => 'privacy_level');
SELECT portal_sync.attach('ehr.ccda_document', 'ccda', 'patient_id',
						  date_col => 'created_at',
						  privacy_col => 'privacy_level',
						  name => 'ccda');
SELECT portal_sync.attach('ehr.visit_note', 'note', 'patient_id',
						  date_col => 'visit_date',
						  privacy_col => 'privacy_level',
						  share_when => 'finalized',
						  enroll_when => 'finalized AND note_type IN (''encounter'', ''well_visit'')');
SELECT portal_sync.attach('ehr.pin', 'pin', 'patient_id',
						  enroll_when => 'generated_by = ''OP''');

-- Pushed whether the patient is enrolled or not.
SELECT portal_sync.attach('ehr.insurance', 'insurance', 'patient_id');

-- Clinical items: only for enrolled patients.
SELECT portal_sync.attach('ehr.medication', 'clinical', 'patient_id',
						  date_col => 'start_date',
						  privacy_col => 'privacy_level',
						  share_when => 'status <> ''entered_in_error''');
SELECT portal_sync.attach('ehr.allergy', 'clinical', 'patient_id',
						  date_col => 'recorded_at',
						  privacy_col => 'privacy_level',
						  share_when => 'status <> ''entered_in_error''');
SELECT portal_sync.attach('ehr.problem', 'clinical', 'patient_id',
						  date_col => 'noted_on',
						  privacy_col => 'privacy_level',
						  share_when => 'status <> ''entered_in_error''');
SELECT portal_sync.attach('ehr.immunization', 'clinical', 'patient_id',
						  date_col => 'administered_on',
						  privacy_col => 'privacy_level');
SELECT portal_sync.attach('ehr.vital_sign', 'clinical', 'patient_id',
						  date_col => 'measured_at',
						  privacy_col => 'privacy_level');
SELECT portal_sync.attach('ehr.lab_result', 'clinical', 'patient_id',
						  date_col => 'result_date',
						  privacy_col => 'privacy_level',
						  share_when => 'status IN (''final'', ''corrected'')');
