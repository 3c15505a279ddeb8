--
-- 05_settings: the one-row portal_sync.settings table (SPEC 4).
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT * FROM regress_util.new_events();
SELECT * FROM portal_sync.settings;

-- The administrator UPDATEs it.
UPDATE portal_sync.settings
SET practice_id = 'peds-west', enabled = false, date_cutoff = '2020-01-01',
	max_privacy_level = 2;
SELECT * FROM portal_sync.settings;
UPDATE portal_sync.settings SET max_privacy_level = 0;
UPDATE portal_sync.settings SET max_privacy_level = 4;
UPDATE portal_sync.settings SET date_cutoff = NULL;
SELECT * FROM portal_sync.settings;

-- CHECK and NOT NULL constraints.
UPDATE portal_sync.settings SET max_privacy_level = 5;
\echo :SQLSTATE
UPDATE portal_sync.settings SET max_privacy_level = -1;
\echo :SQLSTATE
UPDATE portal_sync.settings SET max_privacy_level = NULL;
\echo :SQLSTATE
UPDATE portal_sync.settings SET practice_id = '';
\echo :SQLSTATE
UPDATE portal_sync.settings SET practice_id = NULL;
\echo :SQLSTATE
UPDATE portal_sync.settings SET enabled = NULL;
\echo :SQLSTATE
UPDATE portal_sync.settings SET singleton = false;
\echo :SQLSTATE
UPDATE portal_sync.settings SET date_cutoff = 'not a date';
\echo :SQLSTATE

-- Its one row cannot be deleted; an inserted row (as pg_restore inserts
-- it) replaces the values of the one row instead of adding a second.
DELETE FROM portal_sync.settings;
\echo :SQLSTATE
DELETE FROM portal_sync.settings WHERE false;
\echo :SQLSTATE
TRUNCATE portal_sync.settings;
\echo :SQLSTATE
INSERT INTO portal_sync.settings DEFAULT VALUES;
\echo :SQLSTATE
INSERT INTO portal_sync.settings (singleton, practice_id) VALUES (true, 'other')
ON CONFLICT (singleton) DO UPDATE SET practice_id = excluded.practice_id;
\echo :SQLSTATE
COPY portal_sync.settings (practice_id) FROM stdin;
second
\.
\echo :SQLSTATE
SELECT count(*) AS rows FROM portal_sync.settings;
SELECT * FROM portal_sync.settings;

-- Settings changes queue nothing; with delivery paused (enabled = false)
-- capture goes on.
SELECT * FROM regress_util.new_events();
INSERT INTO ehr.medication (med_id, patient_id, drug_name) VALUES (150, 1, 'cetirizine');
SELECT * FROM regress_util.new_events();

-- Back to the defaults for the following tests.
UPDATE portal_sync.settings
SET practice_id = DEFAULT, enabled = DEFAULT, date_cutoff = DEFAULT,
	max_privacy_level = DEFAULT;
SELECT * FROM portal_sync.settings;
