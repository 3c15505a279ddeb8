/*-------------------------------------------------------------------------
 *
 * status.c
 *		SQL functions that read the delivery worker's shared state.
 *
 * portal_sync.status joins what only the worker knows (its pid, state,
 * last error, backoff) with what the tables say (pending events, dead
 * letters, deliveries).  portal_sync.metrics reads the same slot through
 * worker_metrics(), which gives numbers and the state only (no error text),
 * so that a monitoring role may run it.  While no worker serves the
 * database, both read its entry in the registry of databases: waiting for
 * a turn, or what its last worker showed.  Starting the worker on CREATE
 * EXTENSION is here too: it is a message to the launcher through the same
 * shared state.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
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

/* start_worker() ran in this transaction: register the database at commit. */
static bool start_requested = false;

/*
 * At commit of a transaction that called start_worker() (CREATE EXTENSION
 * does), register the database and start its worker: not before, so that
 * the worker finds the extension, and not if the transaction aborts.
 */
static void
start_worker_at_commit(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT && start_requested)
		registry_note_extension(MyDatabaseId);
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PREPARE)
		start_requested = false;
}

/*
 * portal_sync.start_worker() RETURNS void
 *
 * Ask the launcher to start this database's worker when the transaction
 * commits.
 */
Datum
portal_sync_start_worker(PG_FUNCTION_ARGS)
{
	static bool callback_registered = false;

	if (!callback_registered)
	{
		RegisterXactCallback(start_worker_at_commit, NULL);
		callback_registered = true;
	}
	start_requested = true;
	PG_RETURN_VOID();
}

/*
 * When no worker serves this database: the state status shows, from the
 * registry of databases (the caller holds the lock).  A database waiting
 * for a turn says so; one whose worker ended its turn unable to deliver
 * (backing off, unconfigured...) keeps showing that, with its error.
 */
static WorkerState
state_without_worker(RegisteredDatabase **entry_out)
{
	RegisteredDatabase *entry = registry_lookup(MyDatabaseId);

	*entry_out = entry;
	if (entry == NULL)
		return WORKER_NOT_RUNNING;
	/* a backoff that is over: the database now waits for its turn */
	if (entry->waiting_for_turn &&
		(entry->parked_state == WORKER_NOT_RUNNING ||
		 entry->parked_state == WORKER_BACKING_OFF))
		return WORKER_WAITING_FOR_TURN;
	if (entry->parked_state != WORKER_NOT_RUNNING)
		return entry->parked_state;
	return WORKER_NOT_RUNNING;
}

/*
 * Whether a slot has a worker serving its database now.
 */
static bool
slot_serves(WorkerSlot *slot)
{
	return slot != NULL && slot->pid != 0 && !slot->extension_missing && !slot->leaving;
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
	if (!slot_serves(slot))
	{
		RegisteredDatabase *entry;
		WorkerState state = state_without_worker(&entry);

		nulls[0] = true;
		values[1] = CStringGetTextDatum(worker_state_name(state));
		for (int i = 2; i < 8; i++)
			nulls[i] = true;
		if (state == WORKER_WAITING_FOR_TURN)
		{
			char		message[WORKER_ERROR_LEN];
			int			running = 0;

			for (int i = 0; i < portal_sync_shared->max_workers; i++)
				running += portal_sync_shared->slots[i].in_use &&
					portal_sync_shared->slots[i].pid != 0;
			snprintf(message, sizeof(message),
					 "waiting for a turn of a delivery worker: %d database(s) with pending events wait"
					 " while %d worker(s) serve others (portal_sync.max_workers = %d, and the free"
					 " slots of max_worker_processes)",
					 database_registry->waiting, running, portal_sync_shared->max_workers);
			values[2] = CStringGetTextDatum(message);
			nulls[2] = false;
			values[3] = TimestampTzGetDatum(entry->pending_since);
			nulls[3] = false;
		}
		else if (state != WORKER_NOT_RUNNING)
		{
			values[2] = CStringGetTextDatum(entry->parked_error);
			nulls[2] = entry->parked_error[0] == '\0';
			values[3] = TimestampTzGetDatum(entry->parked_error_at);
			nulls[3] = entry->parked_error_at == 0;
			values[5] = TimestampTzGetDatum(entry->not_before);
			nulls[5] = entry->not_before == 0;
		}
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
	if (!slot_serves(slot))
	{
		RegisteredDatabase *entry;

		values[0] = CStringGetTextDatum(worker_state_name(state_without_worker(&entry)));
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
