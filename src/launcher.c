/*-------------------------------------------------------------------------
 *
 * launcher.c
 *		The launcher: delivery workers for the databases in which
 *		portal_sync is installed, taking turns when there are more such
 *		databases than workers.
 *
 * The launcher is a static background worker, connected to no database.
 * It learns which databases have the extension from the registry of
 * databases (database_registry.c), not by starting workers to look: a
 * database without the extension never gets a worker (except, one at a
 * time and only in a free slot, a candidate the registry cannot vouch
 * for after a promotion or a first start).  A worker that fails is
 * started again after a second.  The launcher starts only after recovery
 * has finished, so nothing is delivered from a hot standby, and
 * everything starts after promotion.
 *
 * While there are enough workers (portal_sync.max_workers, and free
 * background worker slots of max_worker_processes), every registered
 * database has its worker, idle or not.  When databases with pending
 * work find no slot (a full portal_sync slot table, or
 * RegisterDynamicBackgroundWorker saying no), workers take turns: the
 * launcher asks as many workers as there are waiting databases to end
 * their turns, first those with nothing to deliver (idle, backing off,
 * unconfigured, disabled, a copy), then those whose turn has lasted
 * TURN_LENGTH_MS, longest first.  A worker ends its turn between steps,
 * with no request in flight and no transaction open (worker.c), and its
 * database goes to the back of the queue if it still has work.  Free
 * slots go to the databases that have waited longest.
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

/*
 * How long a busy worker keeps its slot while other databases wait for
 * one, and how often the launcher looks again while they wait.
 */
#define TURN_LENGTH_MS				1000
#define TURN_CHECK_MS				100

/* How often, at most, the launcher logs that databases wait for turns. */
#define TURNS_LOG_INTERVAL_MS		(10 * 60 * 1000)

/* What the launcher knows of one database that accepts connections. */
typedef struct KnownDatabase
{
	Oid			dboid;			/* hash key */
	BackgroundWorkerHandle *handle;
	int			slot_index;
	TimestampTz next_start_at;	/* earliest time to start a worker */
	bool		seen;			/* still exists at the last scan */
	bool		adopted;		/* started by an earlier launcher: no handle */
} KnownDatabase;

/* A database that may get a worker in this pass, in the order of turns. */
typedef struct TurnCandidate
{
	KnownDatabase *known;
	bool		pending;		/* has work: waits for a turn */
	bool		candidate;		/* the registry does not know if it has portal_sync */
	TimestampTz since;			/* pending: since when; else end of its last turn */
} TurnCandidate;

static HTAB *known_databases = NULL;

/* Databases of the last scan: all of them, and those a worker may serve. */
static Oid *existing_oids = NULL;
static Oid *servable_oids = NULL;
static int	existing_max = 0;

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
 * ones to the launcher's table, and tell the registry which databases
 * exist.
 */
static void
scan_databases(void)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	HASH_SEQ_STATUS status;
	KnownDatabase *known;
	int			nexisting = 0;
	int			nservable = 0;
	TimestampTz scanned_at;

	hash_seq_init(&status, known_databases);
	while ((known = hash_seq_search(&status)) != NULL)
		known->seen = false;

	StartTransactionCommand();
	scanned_at = GetCurrentTimestamp();
	(void) GetTransactionSnapshot();
	pgstat_report_activity(STATE_RUNNING, "scanning databases");

	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);
		bool		found;

		if (nexisting == existing_max)
		{
			existing_max = Max(64, existing_max * 2);
			existing_oids = repalloc(existing_oids, existing_max * sizeof(Oid));
			servable_oids = repalloc(servable_oids, existing_max * sizeof(Oid));
		}
		existing_oids[nexisting++] = db->oid;
		if (!db->datallowconn || db->datistemplate ||
			db->datconnlimit == DATCONNLIMIT_INVALID_DB)
			continue;
		servable_oids[nservable++] = db->oid;
		known = hash_search(known_databases, &db->oid, HASH_ENTER, &found);
		if (!found)
		{
			known->handle = NULL;
			known->slot_index = -1;
			known->next_start_at = 0;
			known->adopted = false;
		}
		known->seen = true;
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);

	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);

	registry_scan_done(scanned_at, existing_oids, nexisting, servable_oids, nservable);
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
			slot->turn_started_at = GetCurrentTimestamp();
			slot->yield_requested = false;
			slot->leaving = false;
			index = i;
			break;
		}
	}
	LWLockRelease(portal_sync_shared->lock);
	return index;
}

/*
 * Give a claimed slot back (its worker could not be started).
 */
static void
release_slot(int index)
{
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	portal_sync_shared->slots[index].in_use = false;
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Start the worker of a database in a free slot.  Returns false if there
 * is no slot now: all of portal_sync's are taken, or the postmaster has
 * no free background worker slot (max_worker_processes); the database
 * then waits for a turn.
 */
static bool
start_worker(KnownDatabase *known)
{
	BackgroundWorker worker;
	bool		running;

	known->slot_index = claim_slot(known->dboid, &running);
	if (running)
	{
		known->adopted = true;
		return true;
	}
	if (known->slot_index < 0)
		return false;

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
		release_slot(known->slot_index);
		known->slot_index = -1;
		known->handle = NULL;
		return false;
	}
	return true;
}

/*
 * Release the slot of a worker that has stopped.  One that ended its
 * turn, or found no extension, has told the registry what comes next; one
 * that failed is started again after a second.
 */
static void
reap_worker(KnownDatabase *known)
{
	WorkerSlot *slot = &portal_sync_shared->slots[known->slot_index];
	TimestampTz now = GetCurrentTimestamp();
	bool		ended_turn;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	ended_turn = slot->leaving || slot->extension_missing;
	slot->in_use = false;
	slot->pid = 0;
	slot->latch = NULL;
	slot->leaving = false;
	slot->yield_requested = false;
	LWLockRelease(portal_sync_shared->lock);

	if (known->handle != NULL)
		pfree(known->handle);
	known->handle = NULL;
	known->adopted = false;
	known->slot_index = -1;
	known->next_start_at = ended_turn ? 0 :
		TimestampTzPlusMilliseconds(now, WORKER_RESTART_DELAY_MS);
}

/*
 * Order of turns: databases with work first, longest waiting first; then
 * the others (they get a worker only while nobody waits), the one whose
 * last turn ended longest ago first.
 */
static int
turn_order(const void *a, const void *b)
{
	const TurnCandidate *x = a;
	const TurnCandidate *y = b;

	if (x->pending != y->pending)
		return x->pending ? -1 : 1;
	if (x->since != y->since)
		return x->since < y->since ? -1 : 1;
	return 0;
}

/*
 * Whether a worker in this state has nothing it can deliver now, so that
 * it gives its slot up at once to a database that waits.
 */
static bool
state_gives_way(WorkerState state)
{
	return state == WORKER_IDLE || state == WORKER_BACKING_OFF ||
		state == WORKER_UNCONFIGURED || state == WORKER_DISABLED ||
		state == WORKER_NEEDS_ADOPTION;
}

/*
 * Ask workers to end their turns for "waiting" databases: first those
 * with nothing to deliver, then those whose turn is over, longest first.
 * Workers already asked count.
 */
static void
ask_for_turns(int waiting)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz turn_over = TimestampTzPlusMilliseconds(now, -TURN_LENGTH_MS);

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < portal_sync_shared->max_workers; i++)
	{
		WorkerSlot *slot = &portal_sync_shared->slots[i];

		if (slot->in_use && slot->yield_requested)
			waiting--;
	}
	for (int pass = 0; pass < 2 && waiting > 0; pass++)
	{
		while (waiting > 0)
		{
			WorkerSlot *oldest = NULL;

			for (int i = 0; i < portal_sync_shared->max_workers; i++)
			{
				WorkerSlot *slot = &portal_sync_shared->slots[i];

				if (!slot->in_use || slot->pid == 0 || slot->yield_requested ||
					slot->leaving)
					continue;
				if (pass == 0 && !state_gives_way(slot->state))
					continue;
				if (pass == 1 && slot->turn_started_at > turn_over)
					continue;
				if (oldest == NULL || slot->turn_started_at < oldest->turn_started_at)
					oldest = slot;
			}
			if (oldest == NULL)
				break;
			oldest->yield_requested = true;
			if (oldest->latch != NULL)
				SetLatch(oldest->latch);
			waiting--;
		}
	}
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Publish which databases wait for a turn (status says so), and log when
 * turns begin, at most every TURNS_LOG_INTERVAL_MS.
 */
static void
publish_waiting(TurnCandidate *cands, int ncands, int waiting)
{
	static TimestampTz logged_at = 0;
	TimestampTz now = GetCurrentTimestamp();
	bool		began;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	began = database_registry->waiting == 0 && waiting > 0;
	database_registry->waiting = waiting;
	for (int i = 0; i < MAX_REGISTERED_DATABASES; i++)
		database_registry->entries[i].waiting_for_turn = false;
	for (int i = 0; i < ncands; i++)
	{
		RegisteredDatabase *entry;

		if (!cands[i].pending || cands[i].known->slot_index >= 0 ||
			cands[i].known->adopted)
			continue;
		entry = registry_lookup(cands[i].known->dboid);
		if (entry != NULL)
			entry->waiting_for_turn = true;
	}
	LWLockRelease(portal_sync_shared->lock);

	if (began && now - logged_at > (TimestampTz) TURNS_LOG_INTERVAL_MS * 1000)
	{
		ereport(LOG,
				(errmsg_plural("portal_sync: %d database with pending events waits for a delivery worker; workers take turns",
							   "portal_sync: %d databases with pending events wait for a delivery worker; workers take turns",
							   waiting, waiting),
				 errhint("Each database waits a few seconds at most. To give every database its own worker,"
						 " raise portal_sync.max_workers and max_worker_processes.")));
		logged_at = now;
	}
}

/*
 * One pass over the known databases: reap stopped workers, forget dropped
 * databases, start workers in the free slots in the order of turns, and
 * ask for turns to end while databases wait.  Returns the time to sleep.
 */
static long
supervise_workers(Oid requested)
{
	HASH_SEQ_STATUS status;
	KnownDatabase *known;
	TimestampTz now = GetCurrentTimestamp();
	long		sleep_ms = 60 * 1000L;
	TurnCandidate *cands;
	int			ncands = 0;
	int			running = 0;
	int			candidates_running = 0;
	int			waiting = 0;
	bool		no_slot = false;

	cands = palloc(Max(hash_get_num_entries(known_databases), 1) * sizeof(TurnCandidate));

	hash_seq_init(&status, known_databases);
	while ((known = hash_seq_search(&status)) != NULL)
	{
		pid_t		pid;

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
		if (known->dboid == requested)
			known->next_start_at = 0;
	}

	/* who may get a worker, from the registry */
	LWLockAcquire(portal_sync_shared->lock, LW_SHARED);
	hash_seq_init(&status, known_databases);
	while ((known = hash_seq_search(&status)) != NULL)
	{
		RegisteredDatabase *entry = registry_lookup(known->dboid);
		TurnCandidate *cand;

		if (known->handle != NULL || known->adopted)
		{
			running++;
			if (entry != NULL && entry->knowledge == DATABASE_CANDIDATE)
				candidates_running++;
			continue;
		}
		if (entry == NULL || !known->seen)
			continue;
		if (known->next_start_at > now)
		{
			sleep_ms = Min(sleep_ms, (long) ((known->next_start_at - now) / 1000) + 1);
			continue;
		}
		if (entry->not_before > now)
		{
			sleep_ms = Min(sleep_ms, (long) ((entry->not_before - now) / 1000) + 1);
			continue;
		}
		cand = &cands[ncands++];
		cand->known = known;
		cand->pending = entry->work_pending;
		cand->candidate = entry->knowledge == DATABASE_CANDIDATE;
		cand->since = entry->work_pending ? entry->pending_since : entry->last_turn_end;
	}
	LWLockRelease(portal_sync_shared->lock);

	qsort(cands, ncands, sizeof(TurnCandidate), turn_order);

	for (int i = 0; i < ncands; i++)
	{
		TurnCandidate *cand = &cands[i];

		/* a candidate is looked at one at a time */
		if (cand->candidate && candidates_running > 0)
			continue;
		if (database_is_paused(cand->known->dboid))
		{
			sleep_ms = Min(sleep_ms, PAUSE_RECHECK_MS);
			continue;
		}
		if (!no_slot && running < portal_sync_shared->max_workers &&
			start_worker(cand->known))
		{
			running++;
			if (cand->candidate)
				candidates_running++;
			continue;
		}
		no_slot = true;
		if (cand->pending)
		{
			waiting++;
			/* a candidate waits as one, whichever goes first */
			if (cand->candidate)
				candidates_running++;
		}
	}

	publish_waiting(cands, ncands, waiting);
	if (waiting > 0)
	{
		ask_for_turns(waiting);
		sleep_ms = Min(sleep_ms, TURN_CHECK_MS);
	}
	pfree(cands);
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

	registry_load();
	existing_max = 64;
	existing_oids = MemoryContextAlloc(TopMemoryContext, existing_max * sizeof(Oid));
	servable_oids = MemoryContextAlloc(TopMemoryContext, existing_max * sizeof(Oid));

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
		registry_save_if_dirty();

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
