/*-------------------------------------------------------------------------
 *
 * admin.c
 *		The functions a DBA operates portal_sync with: resync_patient,
 *		resync_all, retry_dead_letters, is_ready and wait_ready.
 *
 * They run as the extension's owner, so that a role granted EXECUTE on
 * them needs no privilege on the tables behind them.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/condition_variable.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "portal_sync.h"
#include "unrecorded_writes.h"
#include "shared_state.h"

PG_FUNCTION_INFO_V1(portal_sync_resync_patient);
PG_FUNCTION_INFO_V1(portal_sync_resync_all);
PG_FUNCTION_INFO_V1(portal_sync_retry_dead_letters);
PG_FUNCTION_INFO_V1(portal_sync_is_ready);
PG_FUNCTION_INFO_V1(portal_sync_wait_ready);

/*
 * Connect to SPI as the extension's owner.
 */
static void
begin_as_owner(ExtensionOwnerContext *owner)
{
	become_extension_owner(owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

/*
 * Undo begin_as_owner.
 */
static void
end_as_owner(ExtensionOwnerContext *owner)
{
	SPI_finish();
	restore_user(owner);
}

/*
 * Run a statement with one text parameter (NULL when value is NULL) and
 * return the int8 in the first column of its one row.
 */
static int64
count_of(const char *sql, const char *value)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {value ? CStringGetTextDatum(value) : (Datum) 0};
	char		nulls[2] = {value ? ' ' : 'n', '\0'};
	bool		isnull;
	Datum		result;

	if (SPI_execute_with_args(sql, 1, types, values, nulls, false, 0) < 0 ||
		SPI_processed != 1)
		elog(ERROR, "portal_sync: statement failed");
	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetInt64(result);
}

/*
 * portal_sync.resync_patient(patient_id text) RETURNS bigint
 *
 * Queue a snapshot of an enrolled patient; returns its seq.
 */
Datum
portal_sync_resync_patient(PG_FUNCTION_ARGS)
{
	char	   *patient_id = patient_id_as_captured(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	ExtensionOwnerContext owner;
	int64		seq = 0;
	int64		queued;

	begin_as_owner(&owner);
	queued = queue_resync(patient_id, &seq);
	end_as_owner(&owner);

	if (queued == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("patient \"%s\" is not enrolled", patient_id),
				 errhint("Enroll the patient with portal_sync.enroll() first.")));
	PG_RETURN_INT64(seq);
}

/*
 * Queue every insurance row of the patients who are not enrolled, so that
 * resync_all() applies the rules to what they have on the portal too.
 * The caller runs as the extension's owner, connected to SPI.
 */
static void
resync_insurance_of_unenrolled(void)
{
	SPITupleTable *sources;
	uint64		nsources;

	if (SPI_execute("SELECT s.source_id, n.nspname, c.relname, pa.attname, ka.attname"
					" FROM portal_sync.source s"
					" JOIN pg_catalog.pg_class c ON c.oid = s.relid"
					" JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
					" JOIN pg_catalog.pg_attribute pa ON pa.attrelid = s.relid AND pa.attname = s.patient_col"
					" JOIN pg_catalog.pg_attribute ka ON ka.attrelid = s.relid AND ka.attname = s.key_col"
					" WHERE s.kind = 'insurance'", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading portal_sync.source failed");
	sources = SPI_tuptable;
	nsources = SPI_processed;

	for (uint64 i = 0; i < nsources; i++)
	{
		HeapTuple	tuple = sources->vals[i];
		TupleDesc	desc = sources->tupdesc;
		const char *patient = quote_identifier(SPI_getvalue(tuple, desc, 4));
		const char *key = quote_identifier(SPI_getvalue(tuple, desc, 5));
		Oid			types[1] = {INT4OID};
		Datum		values[1] = {Int32GetDatum(pg_strtoint32(SPI_getvalue(tuple, desc, 1)))};
		char	   *sql;

		sql = psprintf("INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
					   " SELECT pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
					   "        patient, $1, 'u', keys, pg_catalog.statement_timestamp()"
					   " FROM (SELECT portal_sync.value_text(t.%s) AS patient,"
					   "              pg_catalog.array_agg(portal_sync.value_text(t.%s)) AS keys"
					   "       FROM %s t WHERE t.%s IS NOT NULL AND t.%s IS NOT NULL"
					   "       AND NOT EXISTS (SELECT 1 FROM portal_sync.enrollment e"
					   "                       WHERE e.patient_id = portal_sync.value_text(t.%s))"
					   "       GROUP BY 1) unenrolled",
					   patient, key,
					   quote_qualified_identifier(SPI_getvalue(tuple, desc, 2),
												  SPI_getvalue(tuple, desc, 3)),
					   patient, key, patient);
		if (SPI_execute_with_args(sql, 1, types, values, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "queueing insurance for resync_all() failed");
	}
}

/*
 * portal_sync.resync_all() RETURNS bigint
 *
 * Ask for a snapshot of every enrolled patient.  They go to the resync
 * queue, which the worker drains at portal_sync.resync_rate per second, so
 * that incremental updates keep flowing meanwhile.  The insurance rows of
 * patients who are not enrolled are queued again at once.  Returns the
 * number of enrolled patients queued.
 */
Datum
portal_sync_resync_all(PG_FUNCTION_ARGS)
{
	ExtensionOwnerContext owner;
	int64		queued;

	begin_as_owner(&owner);
	queued = count_of("WITH queued AS ("
					  "  INSERT INTO portal_sync.resync_queue (patient_id)"
					  "  SELECT patient_id FROM portal_sync.enrollment ORDER BY patient_id"
					  "  ON CONFLICT (patient_id) DO UPDATE SET requested_at = excluded.requested_at"
					  "  RETURNING 1)"
					  " SELECT pg_catalog.count(*) FROM queued",
					  NULL);
	resync_insurance_of_unenrolled();
	end_as_owner(&owner);
	outbox_note_queued();

	if (queued > 0)
		outbox_note_queued();
	PG_RETURN_INT64(queued);
}

/*
 * portal_sync.retry_dead_letters(patient_id text DEFAULT NULL) RETURNS bigint
 *
 * Send dead-lettered events again (of one patient, or all): each item is
 * queued as a change, so it goes as it is now; a dead snapshot marker or
 * purge of an enrolled patient queues a new snapshot, and the dead purge
 * of a patient no longer enrolled (an unenroll()) is sent again.  Returns the number of dead letters retried.
 */
Datum
portal_sync_retry_dead_letters(PG_FUNCTION_ARGS)
{
	char	   *patient_id = PG_ARGISNULL(0) ? NULL :
		patient_id_as_captured(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	ExtensionOwnerContext owner;
	int64		retried;

	begin_as_owner(&owner);
	retried = count_of("WITH dead AS ("
					   "  DELETE FROM portal_sync.dead_letter"
					   "  WHERE $1 IS NULL OR patient_id = $1"
					   "  RETURNING patient_id, source_id, key, op),"
					   " items AS ("
					   "  INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
					   "  SELECT pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
					   "         patient_id, source_id, 'u',"
					   "         pg_catalog.array_agg(DISTINCT key), pg_catalog.statement_timestamp()"
					   "  FROM dead WHERE source_id IS NOT NULL AND key IS NOT NULL"
					   "  GROUP BY patient_id, source_id"
					   "  RETURNING 1),"
					   " snapshots AS ("
					   "  INSERT INTO portal_sync.resync_queue (patient_id)"
					   "  SELECT DISTINCT d.patient_id FROM dead d WHERE d.source_id IS NULL"
					   "  AND EXISTS (SELECT 1 FROM portal_sync.enrollment e WHERE e.patient_id = d.patient_id)"
					   "  ON CONFLICT (patient_id) DO NOTHING"
					   "  RETURNING 1),"
					   /* the purge of an unenroll(): sent again, as one */
					   " purges AS ("
					   "  INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
					   "  SELECT pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
					   "         p.patient_id, NULL, 'x', ARRAY['retry_dead_letters()'], pg_catalog.statement_timestamp()"
					   "  FROM (SELECT DISTINCT d.patient_id FROM dead d"
					   "        WHERE d.source_id IS NULL AND d.op = 'purge'"
					   "        AND NOT EXISTS (SELECT 1 FROM portal_sync.enrollment e"
					   "                        WHERE e.patient_id = d.patient_id)) p"
					   "  RETURNING 1)"
					   " SELECT pg_catalog.count(*) FROM dead",
					   patient_id);
	end_as_owner(&owner);

	if (retried > 0)
		outbox_note_queued();
	PG_RETURN_INT64(retried);
}

/*
 * Has the portal accepted the patient's snapshot (and not purged it)?
 * The caller is connected to SPI.  Each call sees what is committed now.
 */
static bool
patient_is_ready(const char *patient_id)
{
	return count_of("SELECT pg_catalog.count(*) FROM portal_sync.enrollment"
					" WHERE patient_id = $1 AND snapshot_accepted_at IS NOT NULL"
					" AND NOT purged",
					patient_id) > 0;
}

/*
 * portal_sync.is_ready(patient_id text) RETURNS boolean
 */
Datum
portal_sync_is_ready(PG_FUNCTION_ARGS)
{
	char	   *patient_id = patient_id_as_captured(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	ExtensionOwnerContext owner;
	bool		ready;

	begin_as_owner(&owner);
	ready = patient_is_ready(patient_id);
	end_as_owner(&owner);
	PG_RETURN_BOOL(ready);
}

/*
 * portal_sync.wait_ready(patient_id text, timeout interval) RETURNS boolean
 *
 * Wait until the patient's snapshot is accepted, or the timeout.  Sleeps
 * on a condition variable that the workers broadcast whenever they record
 * an accepted snapshot, so it returns as soon as that commits.
 */
Datum
portal_sync_wait_ready(PG_FUNCTION_ARGS)
{
	char	   *patient_id = patient_id_as_captured(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	Interval   *timeout = PG_GETARG_INTERVAL_P(1);
	int64		timeout_us;
	TimestampTz deadline;
	ExtensionOwnerContext owner;
	bool		ready = false;

	timeout_us = timeout->time + (int64) timeout->day * USECS_PER_DAY +
		(int64) timeout->month * DAYS_PER_MONTH * USECS_PER_DAY;
	if (timeout_us < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("timeout must not be negative")));
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_us / 1000);

	/*
	 * Never wait for ourselves: a snapshot cannot be accepted before the
	 * enrollment that requests it commits, nor before a transaction that
	 * wrote rows of the patient it did not record (the patient was not
	 * enrolled yet) has ended.  Otherwise the worker does not wait for this
	 * transaction on the patient's behalf (unrecorded_writes.c).
	 */
	if (enrollment_is_uncommitted_here(patient_id) ||
		wrote_unrecorded_rows_of(patient_id))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("wait_ready() would wait for its own transaction"),
				 errdetail("This transaction enrolled the patient or wrote rows of the patient before the enrollment; the snapshot is read after it ends."),
				 errhint("Commit first, then call portal_sync.wait_ready() in a new transaction.")));

	begin_as_owner(&owner);
	for (;;)
	{
		long		remaining_ms;

		ConditionVariablePrepareToSleep(&portal_sync_shared->ready_cv);
		ready = patient_is_ready(patient_id);
		remaining_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (ready || remaining_ms <= 0)
			break;
		/* wake at least every second, in case the worker died */
		(void) ConditionVariableTimedSleep(&portal_sync_shared->ready_cv,
										   Min(remaining_ms, 1000L),
										   PG_WAIT_EXTENSION);
		CHECK_FOR_INTERRUPTS();
	}
	ConditionVariableCancelSleep();
	end_as_owner(&owner);

	PG_RETURN_BOOL(ready);
}
