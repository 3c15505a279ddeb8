--
-- 06_privileges: the EHR's roles need no privilege on anything in schema
-- portal_sync, and get none; nothing there is granted to PUBLIC (SPEC 3, 6).
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT * FROM regress_util.new_events();

-- An ordinary EHR application role: DML on the EHR's tables, nothing else.
CREATE ROLE regress_ehr_clerk LOGIN;
GRANT USAGE ON SCHEMA ehr TO regress_ehr_clerk;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA ehr TO regress_ehr_clerk;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA ehr TO regress_ehr_clerk;

SELECT c.relname, has_table_privilege('regress_ehr_clerk', c.oid, 'SELECT') AS sel,
	   has_table_privilege('regress_ehr_clerk', c.oid, 'INSERT') AS ins
FROM pg_class c WHERE c.relnamespace = 'portal_sync'::regnamespace
  AND has_table_privilege('regress_ehr_clerk', c.oid,
						  'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER');
SELECT p.oid::regprocedure FROM pg_proc p
WHERE p.pronamespace = 'portal_sync'::regnamespace
  AND has_function_privilege('regress_ehr_clerk', p.oid, 'EXECUTE');
SELECT has_schema_privilege('regress_ehr_clerk', 'portal_sync', 'USAGE') AS usage;

SET ROLE regress_ehr_clerk;

-- Writing every attached table works, and is captured.
-- appointment: enrolls 45
INSERT INTO ehr.appointment (appt_id, patient_id, provider, starts_at)
VALUES (1045, 45, 'Dr. Evans', '2026-02-06 09:00-05');
-- clinical items for 45 (enrolled) and 46 (not)
INSERT INTO ehr.medication (med_id, patient_id, drug_name) VALUES (145, 45, 'amoxicillin'), (146, 46, 'ibuprofen');
INSERT INTO ehr.allergy (allergy_id, patient_id, allergen) VALUES (245, 45, 'sulfa');
INSERT INTO ehr.problem (problem_id, patient_id, description) VALUES (445, 45, 'Otitis media');
INSERT INTO ehr.immunization (imm_id, patient_id, vaccine, administered_on) VALUES (345, 45, 'Influenza', '2026-01-10');
INSERT INTO ehr.vital_sign (vital_id, patient_id, measured_at, weight_kg) VALUES (545, 45, '2026-01-10 10:00', 21.3);
INSERT INTO ehr.lab_result (result_id, patient_id, test_name, status, result_date) VALUES
	(645, 45, 'Strep A rapid', 'final', '2026-01-10'),
	(646, NULL, 'Strep A rapid', 'final', '2026-01-10');
UPDATE ehr.medication SET dose = '250 mg' WHERE med_id IN (145, 146);
UPDATE ehr.medication SET patient_id = 45 WHERE med_id = 146;
DELETE FROM ehr.allergy WHERE allergy_id = 245;
UPDATE ehr.patient SET guardian_phone = '555-0145' WHERE patient_id IN (45, 46);
-- insurance for a patient nobody enrolled
INSERT INTO ehr.insurance (ins_id, patient_id, payer, member_id) VALUES (747, 47, 'Humana', 'H0047');
-- note, ccda and pin initiating events
INSERT INTO ehr.visit_note (note_id, patient_id, provider, note_type, visit_date) VALUES (2048, 48, 'Dr. Evans', 'encounter', '2026-01-10');
UPDATE ehr.visit_note SET finalized = true WHERE note_id = 2048;
INSERT INTO ehr.ccda_document (doc_id, patient_id, document) VALUES (4049, 49, '<ClinicalDocument/>');
INSERT INTO ehr.pin (pin_id, patient_id, pin, generated_by) VALUES (3050, 50, '246-802', 'OP'), (3051, 51, '135-791', 'PORTAL');

-- ...but portal_sync itself is out of reach.
SELECT * FROM portal_sync.outbox;
\echo :SQLSTATE
SELECT * FROM portal_sync.settings;
\echo :SQLSTATE
UPDATE portal_sync.settings SET max_privacy_level = 4;
\echo :SQLSTATE
SELECT * FROM portal_sync.sources;
\echo :SQLSTATE
INSERT INTO portal_sync.enrollment (patient_id, enrolled_by) VALUES ('52', 'me');
\echo :SQLSTATE
SELECT portal_sync.enroll('52');
\echo :SQLSTATE
SELECT portal_sync.attach('ehr.medication', 'insurance', 'patient_id');
\echo :SQLSTATE
SELECT portal_sync.detach('ehr.medication');
\echo :SQLSTATE
-- nor can the capture function be put on a table of its own
RESET ROLE;
CREATE SCHEMA regress_clerk_own AUTHORIZATION regress_ehr_clerk;
SET ROLE regress_ehr_clerk;
CREATE TABLE regress_clerk_own.fake (id int PRIMARY KEY, patient_id int);
CREATE TRIGGER portal_sync_capture_insert AFTER INSERT ON regress_clerk_own.fake
	REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
	EXECUTE FUNCTION portal_sync.capture();
\echo :SQLSTATE
-- the auth token is superuser-only
SHOW portal_sync.auth_token;
\echo :SQLSTATE
SELECT count(*) FROM pg_settings WHERE name = 'portal_sync.auth_token';

-- Capture does not depend on the writer's search_path, and never calls
-- the writer's functions or operators with the extension's rights.
CREATE FUNCTION regress_clerk_own.now() RETURNS timestamptz LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'hijacked now() as %', current_user; RETURN pg_catalog.now(); END $$;
CREATE FUNCTION regress_clerk_own.clock_timestamp() RETURNS timestamptz LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'hijacked clock_timestamp() as %', current_user; RETURN pg_catalog.clock_timestamp(); END $$;
CREATE FUNCTION regress_clerk_own.statement_timestamp() RETURNS timestamptz LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'hijacked statement_timestamp() as %', current_user; RETURN pg_catalog.statement_timestamp(); END $$;
CREATE FUNCTION regress_clerk_own.transaction_timestamp() RETURNS timestamptz LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'hijacked transaction_timestamp() as %', current_user; RETURN pg_catalog.transaction_timestamp(); END $$;
CREATE FUNCTION regress_clerk_own.nextval(regclass) RETURNS bigint LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'hijacked nextval() as %', current_user; RETURN pg_catalog.nextval($1); END $$;
CREATE FUNCTION regress_clerk_own.texteq(text, text) RETURNS boolean LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'hijacked text = as %', current_user; RETURN pg_catalog.texteq($1, $2); END $$;
CREATE OPERATOR regress_clerk_own.= (LEFTARG = text, RIGHTARG = text, FUNCTION = regress_clerk_own.texteq);
CREATE FUNCTION regress_clerk_own.int4eq(int, int) RETURNS boolean LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'hijacked int4 = as %', current_user; RETURN pg_catalog.int4eq($1, $2); END $$;
CREATE OPERATOR regress_clerk_own.= (LEFTARG = int, RIGHTARG = int, FUNCTION = regress_clerk_own.int4eq);
CREATE FUNCTION regress_clerk_own.oideq(oid, oid) RETURNS boolean LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'hijacked oid = as %', current_user; RETURN pg_catalog.oideq($1, $2); END $$;
CREATE OPERATOR regress_clerk_own.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = regress_clerk_own.oideq);
CREATE FUNCTION regress_clerk_own.int8eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'hijacked int8 = as %', current_user; RETURN pg_catalog.int8eq($1, $2); END $$;
CREATE OPERATOR regress_clerk_own.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = regress_clerk_own.int8eq);
CREATE TABLE regress_clerk_own.enrollment (patient_id text, enrolled_by text);
CREATE TABLE regress_clerk_own.outbox (seq bigint, patient_id text);
SET search_path = regress_clerk_own, pg_catalog;
INSERT INTO ehr.appointment (appt_id, patient_id, provider, starts_at)
VALUES (1053, 53, 'Dr. Evans', '2026-02-06 10:00-05');
INSERT INTO ehr.medication (med_id, patient_id, drug_name) VALUES (153, 53, 'amoxicillin');
UPDATE ehr.medication SET patient_id = 45 WHERE med_id = 153;
INSERT INTO ehr.insurance (ins_id, patient_id, payer, member_id) VALUES (754, 54, 'Humana', 'H0054');
INSERT INTO ehr.lab_result (result_id, patient_id, test_name, status, result_date) VALUES (654, NULL, 'CBC', 'final', '2026-01-10');
SET search_path = '';
INSERT INTO ehr.pin (pin_id, patient_id, pin, generated_by) VALUES (3055, 55, '975-310', 'OP');
RESET search_path;
SELECT count(*) AS own_enrollment_rows FROM regress_clerk_own.enrollment;
SELECT count(*) AS own_outbox_rows FROM regress_clerk_own.outbox;
RESET ROLE;

SELECT * FROM regress_util.new_events();
SELECT * FROM regress_util.enrolled() WHERE patient_id::int BETWEEN 45 AND 59;
SELECT * FROM regress_util.skipped();

--
-- Nothing in schema portal_sync is granted to PUBLIC.
--
SELECT has_schema_privilege('public', 'portal_sync', 'USAGE') AS usage,
	   has_schema_privilege('public', 'portal_sync', 'CREATE') AS "create";
SELECT c.oid::regclass AS relation, c.relkind
FROM pg_class c
WHERE c.relnamespace = 'portal_sync'::regnamespace
  AND (EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0)
	   OR EXISTS (SELECT 1 FROM pg_attribute at, aclexplode(at.attacl) a
				  WHERE at.attrelid = c.oid AND a.grantee = 0));
SELECT c.oid::regclass AS relation FROM pg_class c
WHERE c.relnamespace = 'portal_sync'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
  AND has_table_privilege('public', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER');
SELECT c.oid::regclass AS sequence FROM pg_class c
WHERE c.relnamespace = 'portal_sync'::regnamespace AND c.relkind = 'S'
  AND CASE WHEN c.relkind = 'S'
		   THEN has_sequence_privilege('public', c.oid, 'USAGE, SELECT, UPDATE') END;
SELECT p.oid::regprocedure AS function FROM pg_proc p
WHERE p.pronamespace = 'portal_sync'::regnamespace
  AND has_function_privilege('public', p.oid, 'EXECUTE');
-- and no default privileges hand future objects to anyone
SELECT count(*) AS default_acls FROM pg_default_acl
WHERE defaclnamespace = 'portal_sync'::regnamespace;
--
-- pg_monitor (postgres_exporter's role) gets the monitoring view and the
-- function it calls, and nothing else: no table, no other view.
--
SELECT c.oid::regclass AS relation FROM pg_class c
WHERE c.relnamespace = 'portal_sync'::regnamespace
  AND has_table_privilege('pg_monitor', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER');
SELECT p.oid::regprocedure AS function FROM pg_proc p
WHERE p.pronamespace = 'portal_sync'::regnamespace
  AND has_function_privilege('pg_monitor', p.oid, 'EXECUTE');
SELECT has_schema_privilege('pg_monitor', 'portal_sync', 'USAGE') AS usage,
	   has_schema_privilege('pg_monitor', 'portal_sync', 'CREATE') AS "create";
CREATE ROLE regress_exporter LOGIN IN ROLE pg_monitor;
SET ROLE regress_exporter;
SELECT datname = current_database() AS this_db, worker_state IS NOT NULL AS has_state,
	   pending_events >= 0 AS has_pending
FROM portal_sync.metrics;
SELECT * FROM portal_sync.outbox;
\echo :SQLSTATE
SELECT * FROM portal_sync.status;
\echo :SQLSTATE
SELECT * FROM portal_sync.worker_status();
\echo :SQLSTATE
SELECT * FROM ehr.patient;
\echo :SQLSTATE
RESET ROLE;
DROP ROLE regress_exporter;
-- Clean up the role.
DROP SCHEMA regress_clerk_own CASCADE;
REVOKE ALL ON ALL TABLES IN SCHEMA ehr FROM regress_ehr_clerk;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA ehr FROM regress_ehr_clerk;
REVOKE ALL ON SCHEMA ehr FROM regress_ehr_clerk;
DROP ROLE regress_ehr_clerk;
