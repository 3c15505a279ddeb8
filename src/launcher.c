/*-------------------------------------------------------------------------
 *
 * launcher.c
 *		The launcher: one delivery worker for every database in which
 *		portal_sync is installed.
 *
 * The launcher is a static background worker, connected to no database.
 * It does not know which databases have the extension, so it starts a
 * worker in every database that accepts connections; a worker that finds
 * no extension says so in its slot and exits, and that database is probed
 * again only rarely.  CREATE EXTENSION wakes the launcher to start the
 * worker at once.  A worker that fails is started again after a second.
 * The launcher starts only after recovery has finished, so nothing is
 * delivered from a hot standby, and everything starts after promotion.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "portal_sync.h"
#include "shared_state.h"

/* How long to wait before starting a failed worker again. */
#define WORKER_RESTART_DELAY_MS		1000

/*
 * How often a paused database is looked at again (the end of the command
 * wakes the launcher; this catches a command whose backend died).
 */
#define PAUSE_RECHECK_MS			1000

/* How often a database without the extension is probed again. */
#define EXTENSION_PROBE_INTERVAL_MS	(5 * 60 * 1000)

/* What the launcher knows of one database. */
typedef struct KnownDatabase
{
	Oid			dboid;			/* hash key */
	BackgroundWorkerHandle *handle;
	int			slot_index;
	TimestampTz next_start_at;	/* earliest time to start a worker */
	bool		seen;			/* still exists at the last scan */
	bool		adopted;		/* started by an earlier launcher: no handle */
	TimestampTz requested_at;	/* CREATE EXTENSION asked for a worker */
} KnownDatabase;

static HTAB *known_databases = NULL;

/*
 * Register the launcher with the postmaster; called from _PG_init.
 */
void
register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "portal_sync");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "portal_sync_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "portal_sync launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "portal_sync launcher");
	RegisterBackgroundWorker(&worker);
}

/*
 * Forget the launcher's latch when it exits.
 */
static void
launcher_detach(int code, Datum arg)
{
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	portal_sync_shared->launcher_latch = NULL;
	portal_sync_shared->launcher_pid = 0;
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Mark every database that accepts connections as seen, adding the new
 * ones to the launcher's table.
 */
static void
scan_databases(void)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	HASH_SEQ_STATUS status;
	KnownDatabase *known;

	hash_seq_init(&status, known_databases);
	while ((known = hash_seq_search(&status)) != NULL)
		known->seen = false;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	pgstat_report_activity(STATE_RUNNING, "scanning databases");

	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);
		bool		found;

		if (!db->datallowconn || db->datistemplate ||
			db->datconnlimit == DATCONNLIMIT_INVALID_DB)
			continue;
		known = hash_search(known_databases, &db->oid, HASH_ENTER, &found);
		if (!found)
		{
			known->handle = NULL;
			known->slot_index = -1;
			known->next_start_at = 0;
			known->adopted = false;
			known->requested_at = 0;
		}
		known->seen = true;
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);

	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Claim a free worker slot for a database; -1 if all are taken.  A slot
 * still held for the database by a worker that an earlier launcher
 * started (this one was restarted) is adopted instead: *running says so.
 */
static int
claim_slot(Oid dboid, bool *running)
{
	int			index = -1;

	*running = false;
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < portal_sync_shared->max_workers; i++)
	{
		WorkerSlot *slot = &portal_sync_shared->slots[i];

		if (slot->in_use && slot->dboid == dboid)
		{
			*running = slot->pid != 0;
			index = i;
			break;
		}
	}
	for (int i = 0; index < 0 && i < portal_sync_shared->max_workers; i++)
	{
		WorkerSlot *slot = &portal_sync_shared->slots[i];

		if (!slot->in_use)
		{
			slot->in_use = true;
			slot->dboid = dboid;
			slot->pid = 0;
			slot->latch = NULL;
			slot->extension_missing = false;
			slot->state = WORKER_NOT_RUNNING;
			index = i;
			break;
		}
	}
	LWLockRelease(portal_sync_shared->lock);
	return index;
}

/*
 * Start the worker of a database in a claimed slot.
 */
static void
start_worker(KnownDatabase *known)
{
	BackgroundWorker worker;
	static bool warned_full = false;

	if (known->slot_index < 0)
	{
		bool		running;

		known->slot_index = claim_slot(known->dboid, &running);
		if (running)
		{
			known->adopted = true;
			return;
		}
		if (known->slot_index < 0)
		{
			if (!warned_full)
				ereport(WARNING,
						(errmsg("portal_sync: all %d delivery worker slots are in use",
								portal_sync_max_workers),
						 errhint("Raise portal_sync.max_workers (and max_worker_processes).")));
			warned_full = true;
			return;
		}
	}

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	worker.bgw_notify_pid = MyProcPid;
	worker.bgw_main_arg = Int32GetDatum(known->slot_index);
	memcpy(worker.bgw_extra, &known->dboid, sizeof(Oid));
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "portal_sync");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "portal_sync_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "portal_sync worker for database %u", known->dboid);
	snprintf(worker.bgw_type, BGW_MAXLEN, "portal_sync worker");

	if (!RegisterDynamicBackgroundWorker(&worker, &known->handle))
	{
		ereport(LOG,
				(errmsg("portal_sync: could not start a delivery worker for database %u",
						known->dboid),
				 errhint("Raise max_worker_processes.")));
		known->handle = NULL;
		known->next_start_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														   WORKER_RESTART_DELAY_MS * 5);
	}
}

/*
 * Release the slot of a worker that has stopped, deciding when to start
 * one again: soon after a failure, rarely where the extension is missing.
 */
static void
reap_worker(KnownDatabase *known)
{
	WorkerSlot *slot = &portal_sync_shared->slots[known->slot_index];
	TimestampTz now = GetCurrentTimestamp();
	int			delay = WORKER_RESTART_DELAY_MS;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	/*
	 * A worker may find no extension because the CREATE EXTENSION that
	 * asked for it has not committed yet: for a minute after such a
	 * request, try again soon.
	 */
	if (slot->extension_missing &&
		now - known->requested_at > (TimestampTz) 60 * USECS_PER_SEC)
		delay = EXTENSION_PROBE_INTERVAL_MS;
	slot->in_use = false;
	slot->pid = 0;
	slot->latch = NULL;
	LWLockRelease(portal_sync_shared->lock);

	if (known->handle != NULL)
		pfree(known->handle);
	known->handle = NULL;
	known->adopted = false;
	known->slot_index = -1;
	known->next_start_at = TimestampTzPlusMilliseconds(now, delay);
}

/*
 * One pass over the known databases: reap stopped workers, start missing
 * ones that are due, forget dropped databases.  Returns the time to sleep.
 */
static long
supervise_workers(Oid requested)
{
	HASH_SEQ_STATUS status;
	KnownDatabase *known;
	TimestampTz now = GetCurrentTimestamp();
	long		sleep_ms = EXTENSION_PROBE_INTERVAL_MS;

	hash_seq_init(&status, known_databases);
	while ((known = hash_seq_search(&status)) != NULL)
	{
		pid_t		pid;

		if (known->dboid == requested)
			known->requested_at = now;

		if (known->handle != NULL &&
			GetBackgroundWorkerPid(known->handle, &pid) == BGWH_STOPPED)
			reap_worker(known);
		else if (known->adopted &&
				 portal_sync_shared->slots[known->slot_index].pid == 0)
			reap_worker(known);

		if (!known->seen)
		{
			if (known->handle == NULL && !known->adopted)
				hash_search(known_databases, &known->dboid, HASH_REMOVE, NULL);
			continue;
		}

		if (known->handle == NULL && !known->adopted)
		{
			bool		paused = database_is_paused(known->dboid);

			if (known->dboid == requested)
				known->next_start_at = 0;
			if (!paused && known->next_start_at <= now)
				start_worker(known);
			else if (paused)
				sleep_ms = Min(sleep_ms, PAUSE_RECHECK_MS);
			else
				sleep_ms = Min(sleep_ms, (long) ((known->next_start_at - now) / 1000) + 1);
		}
	}
	return Max(sleep_ms, 10);
}

/*
 * Main function of the launcher.
 */
void
portal_sync_launcher_main(Datum arg)
{
	HASHCTL		ctl;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	portal_sync_shared->launcher_pid = MyProcPid;
	portal_sync_shared->launcher_latch = MyLatch;
	LWLockRelease(portal_sync_shared->lock);
	before_shmem_exit(launcher_detach, (Datum) 0);

	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(KnownDatabase);
	known_databases = hash_create("portal_sync databases", 16, &ctl,
								  HASH_ELEM | HASH_BLOBS);

	for (;;)
	{
		Oid			requested;
		long		sleep_ms;

		LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
		requested = portal_sync_shared->requested_database;
		portal_sync_shared->requested_database = InvalidOid;
		LWLockRelease(portal_sync_shared->lock);

		scan_databases();
		sleep_ms = supervise_workers(requested);

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min(sleep_ms, 60 * 1000L),
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
	}
}
