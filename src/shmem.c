/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		Shared memory of portal_sync: the launcher and one slot per
 *		delivery worker.
 *
 * A slot belongs to one database while its worker runs.  It holds the
 * worker's latch (so that committing EHR transactions can wake it), the
 * worker's state for portal_sync.status, and a condition variable that
 * wait_ready() sleeps on.  Everything here is lost on restart by design:
 * the durable state lives in the extension's tables (and the registry of
 * databases in its own file, database_registry.c).
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "portal_sync.h"
#include "unrecorded_writes.h"
#include "shared_state.h"

PortalSyncShared *portal_sync_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/*
 * Size of the shared state: the header and max_workers slots.
 */
static Size
shared_state_size(void)
{
	return add_size(offsetof(PortalSyncShared, slots),
					mul_size(portal_sync_max_workers, sizeof(WorkerSlot)));
}

/*
 * shmem_request_hook: ask for our memory and our lock.
 */
static void
portal_sync_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(shared_state_size());
	RequestAddinShmemSpace(unrecorded_writes_shmem_size());
	RequestAddinShmemSpace(database_registry_shmem_size());
	RequestNamedLWLockTranche("portal_sync", 2);	/* shared state, unrecorded writes */
}

/*
 * shmem_startup_hook: set up the shared state on first attach.
 */
static void
portal_sync_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	portal_sync_shared = ShmemInitStruct("portal_sync", shared_state_size(), &found);
	if (!found)
	{
		memset(portal_sync_shared, 0, shared_state_size());
		portal_sync_shared->lock = &(GetNamedLWLockTranche("portal_sync"))->lock;
		portal_sync_shared->max_workers = portal_sync_max_workers;
		ConditionVariableInit(&portal_sync_shared->ready_cv);
		for (int i = 0; i < portal_sync_shared->max_workers; i++)
			pg_atomic_init_u64(&portal_sync_shared->slots[i].wakes, 0);
	}
	unrecorded_writes_shmem_init();
	database_registry_shmem_init();
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Install the hooks; called from _PG_init.
 */
void
shared_state_install_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = portal_sync_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = portal_sync_shmem_startup;
}

/*
 * The slot of the worker of a database, or NULL.  The caller holds the
 * lock, in either mode.
 */
WorkerSlot *
worker_slot_for_database(Oid dboid)
{
	for (int i = 0; i < portal_sync_shared->max_workers; i++)
	{
		WorkerSlot *slot = &portal_sync_shared->slots[i];

		if (slot->in_use && slot->dboid == dboid)
			return slot;
	}
	return NULL;
}

/*
 * Wake a worker that serves its database; the caller holds the lock.  The
 * wake is counted, so that a worker ending its turn knows whether a commit
 * came after its last look at the outbox.
 */
static void
wake_serving_worker(WorkerSlot *slot, bool always)
{
	pg_atomic_fetch_add_u64(&slot->wakes, 1);

	/*
	 * A worker without an endpoint, paused or waiting out a backoff would
	 * only go back to sleep: don't make every EHR commit wake it.
	 */
	if (slot->latch != NULL &&
		(always || slot->state == WORKER_IDLE || slot->state == WORKER_RUNNING ||
		 slot->state == WORKER_WAITING))
		SetLatch(slot->latch);
}

/*
 * Wake the delivery worker of a database, if it runs.  Called at commit
 * of a transaction that queued events: the latency of delivery is the
 * latency of this SetLatch, not of a polling interval.  "always" wakes it
 * whatever it is doing (the settings changed).  A database that no worker
 * serves (it waits for a turn, or its worker ended its turn) is queued
 * for one, and the launcher woken.
 */
void
wake_worker_of_database(Oid dboid, bool always)
{
	WorkerSlot *slot;

	if (portal_sync_shared == NULL)
		return;
	LWLockAcquire(portal_sync_shared->lock, LW_SHARED);
	slot = worker_slot_for_database(dboid);
	if (slot != NULL && !slot->leaving)
	{
		wake_serving_worker(slot, always);
		LWLockRelease(portal_sync_shared->lock);
		return;
	}
	LWLockRelease(portal_sync_shared->lock);

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	slot = worker_slot_for_database(dboid);
	if (slot != NULL && !slot->leaving)
		wake_serving_worker(slot, always);
	else
		registry_note_work_locked(dboid, always);
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Wake the launcher, asking it to start this database's worker now.
 */
void
wake_launcher_for_database(Oid dboid)
{
	if (portal_sync_shared == NULL)
		return;
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	portal_sync_shared->requested_database = dboid;
	if (portal_sync_shared->launcher_latch != NULL)
		SetLatch(portal_sync_shared->launcher_latch);
	LWLockRelease(portal_sync_shared->lock);
}
