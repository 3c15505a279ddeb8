/*-------------------------------------------------------------------------
 *
 * status.c
 *		SQL functions that read the delivery worker's shared state.
 *
 * portal_sync.status joins what only the worker knows (its pid, state,
 * last error, backoff) with what the tables say (pending events, dead
 * letters, deliveries).  portal_sync.metrics reads the same slot through
 * worker_metrics(), which gives numbers and the state only (no error text),
 * so that a monitoring role may run it.  Starting the worker on CREATE
 * EXTENSION is here too: it is a message to the launcher through the same
 * shared state.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "commands/trigger.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "portal_sync.h"
#include "shared_state.h"

PG_FUNCTION_INFO_V1(portal_sync_worker_status);
PG_FUNCTION_INFO_V1(portal_sync_worker_metrics);
PG_FUNCTION_INFO_V1(portal_sync_start_worker);
PG_FUNCTION_INFO_V1(portal_sync_settings_changed);

/*
 * portal_sync.start_worker() RETURNS void
 *
 * Ask the launcher to start this database's worker now.
 */
Datum
portal_sync_start_worker(PG_FUNCTION_ARGS)
{
	wake_launcher_for_database(MyDatabaseId);
	PG_RETURN_VOID();
}

/*
 * portal_sync.settings_changed() RETURNS trigger
 *
 * After an UPDATE of portal_sync.settings: wake the worker at commit, so
 * that delivery resumes at once when it is enabled again.
 */
Datum
portal_sync_settings_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "portal_sync.settings_changed() must be called as a trigger");
	outbox_note_settings_changed();
	return PointerGetDatum(NULL);
}

/*
 * portal_sync.worker_status() RETURNS record
 *
 * The worker's own view of itself, for the status view.
 */
Datum
portal_sync_worker_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[8];
	bool		nulls[8] = {false};
	WorkerSlot *slot;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	LWLockAcquire(portal_sync_shared->lock, LW_SHARED);
	slot = worker_slot_for_database(MyDatabaseId);
	if (slot == NULL || slot->pid == 0 || slot->extension_missing)
	{
		nulls[0] = true;
		values[1] = CStringGetTextDatum(worker_state_name(WORKER_NOT_RUNNING));
		for (int i = 2; i < 8; i++)
			nulls[i] = true;
	}
	else
	{
		values[0] = Int32GetDatum(slot->pid);
		values[1] = CStringGetTextDatum(worker_state_name(slot->state));
		if (slot->last_error[0] != '\0')
			values[2] = CStringGetTextDatum(slot->last_error);
		else
			nulls[2] = true;
		values[3] = TimestampTzGetDatum(slot->last_error_at);
		nulls[3] = slot->last_error_at == 0;
		values[4] = Int32GetDatum(slot->consecutive_failures);
		values[5] = TimestampTzGetDatum(slot->next_attempt_at);
		nulls[5] = slot->next_attempt_at == 0;
		values[6] = Int64GetDatum((int64) slot->delivered_total);
		if (slot->hold_reason[0] != '\0')
			values[7] = CStringGetTextDatum(slot->hold_reason);
		else
			nulls[7] = true;
	}
	LWLockRelease(portal_sync_shared->lock);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * portal_sync.worker_metrics() RETURNS record
 *
 * What the monitoring view needs of the worker's shared state: its state,
 * its failures in a row, whether the last failure was an authentication
 * failure, and the events it has delivered.  No error text: the exporter's
 * role may run this, and needs nothing more.  delivered_total is NULL while
 * no worker runs: the counter lives in the worker, and a 0 there would read
 * as a counter reset followed by a jump when the next worker seeds it from
 * delivery_log.
 */
Datum
portal_sync_worker_metrics(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[4];
	bool		nulls[4] = {false};
	WorkerSlot *slot;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	LWLockAcquire(portal_sync_shared->lock, LW_SHARED);
	slot = worker_slot_for_database(MyDatabaseId);
	if (slot == NULL || slot->pid == 0 || slot->extension_missing)
	{
		values[0] = CStringGetTextDatum(worker_state_name(WORKER_NOT_RUNNING));
		values[1] = Int32GetDatum(0);
		nulls[2] = true;
		values[3] = BoolGetDatum(false);
	}
	else
	{
		values[0] = CStringGetTextDatum(worker_state_name(slot->state));
		values[1] = Int32GetDatum(slot->consecutive_failures);
		values[2] = Int64GetDatum((int64) slot->delivered_total);
		/* a new worker in the slot starts with no failures, and no auth failure */
		values[3] = BoolGetDatum(slot->auth_failure && slot->consecutive_failures > 0);
	}
	LWLockRelease(portal_sync_shared->lock);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
