/*-------------------------------------------------------------------------
 *
 * seq_fence.c
 *		Which seqs of the outbox can no longer be overtaken.
 *
 * seq is taken from a sequence when an event is queued, but transactions
 * commit in another order: a transaction may still be about to commit an
 * event with seq 46 when the worker already sees 47.  Sending 47 first
 * would break the per-patient order of SPEC §5.  So every transaction,
 * before it takes its first seq, publishes a floor in shared memory: a
 * value below any seq it will take.  The worker sends only events whose
 * seq is at most the lowest published floor (and at most the sequence's
 * current value): every event at or below it is committed or gone.  A
 * floor is withdrawn when its transaction ends.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/backendid.h"
#include "storage/shmem.h"

#include "portal_sync.h"
#include "seq_fence.h"
#include "shared_state.h"

#define NO_FLOOR	PG_UINT64_MAX

/* The floor of one backend's transaction. */
typedef struct BackendFloor
{
	pg_atomic_uint64 floor;		/* NO_FLOOR when none */
	Oid			dboid;			/* the database the floor is about */
} BackendFloor;

typedef struct SeqFence
{
	int			nfloors;
	BackendFloor floors[FLEXIBLE_ARRAY_MEMBER];	/* per backend */
} SeqFence;

static SeqFence *seq_fence = NULL;
static bool floor_published = false;

/*
 * Shared memory needed for the floors.
 */
Size
seq_fence_shmem_size(void)
{
	return add_size(offsetof(SeqFence, floors),
					mul_size(MaxBackends, sizeof(BackendFloor)));
}

/*
 * Set up the floors; called from the shmem startup hook.
 */
void
seq_fence_shmem_init(void)
{
	bool		found;

	seq_fence = ShmemInitStruct("portal_sync seq fence", seq_fence_shmem_size(), &found);
	if (!found)
	{
		seq_fence->nfloors = MaxBackends;
		for (int i = 0; i < MaxBackends; i++)
		{
			pg_atomic_init_u64(&seq_fence->floors[i].floor, NO_FLOOR);
			seq_fence->floors[i].dboid = InvalidOid;
		}
	}
}

/*
 * Withdraw the floor when the transaction ends.  At commit this runs
 * after the transaction became visible, so the worker never passes a seq
 * it cannot see yet.
 */
static void
withdraw_floor(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PARALLEL_ABORT:
			if (floor_published)
			{
				pg_atomic_write_u64(&seq_fence->floors[MyBackendId - 1].floor, NO_FLOOR);
				floor_published = false;
			}
			break;
		default:
			break;
	}
}

/*
 * Publish this transaction's floor before it takes its first seq: the
 * sequence's value as this database's worker last read it, which is no
 * more than any seq taken from now on.  Without a worker, the floor is 0:
 * a new worker waits for this transaction before sending anything.
 */
void
seq_fence_claim(void)
{
	static bool callback_registered = false;
	BackendFloor *mine;
	WorkerSlot *slot;
	uint64		floor = 0;

	if (floor_published || seq_fence == NULL)
		return;
	if (!callback_registered)
	{
		RegisterXactCallback(withdraw_floor, NULL);
		callback_registered = true;
	}

	LWLockAcquire(portal_sync_shared->lock, LW_SHARED);
	slot = worker_slot_for_database(MyDatabaseId);
	if (slot != NULL)
		floor = pg_atomic_read_u64(&slot->sequence_seen);
	LWLockRelease(portal_sync_shared->lock);

	mine = &seq_fence->floors[MyBackendId - 1];
	mine->dboid = MyDatabaseId;
	pg_write_barrier();
	pg_atomic_write_u64(&mine->floor, floor);
	floor_published = true;
	/* the floor must be visible before the seq it guards is taken */
	pg_memory_barrier();
}

/*
 * The highest seq the worker of this database may send, given the
 * sequence's current value read just before: no transaction still running
 * can commit an event at or below it.  The value read becomes the floor
 * of the transactions that start taking seqs from now on.
 */
int64
seq_fence_safe_seq(WorkerSlot *slot, int64 sequence_value)
{
	uint64		safe = (uint64) Max(sequence_value, 0);

	pg_atomic_write_u64(&slot->sequence_seen, safe);
	pg_memory_barrier();
	for (int i = 0; i < MaxBackends; i++)
	{
		BackendFloor *other = &seq_fence->floors[i];
		uint64		floor = pg_atomic_read_u64(&other->floor);

		pg_read_barrier();
		if (floor != NO_FLOOR && other->dboid == MyDatabaseId && i != MyBackendId - 1)
			safe = Min(safe, floor);
	}
	return (int64) safe;
}
