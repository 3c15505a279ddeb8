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
 * value below any seq it will take; and before it takes a seq for a
 * patient, it adds the patient to a 64-bit set (by hash) beside the
 * floor.  The worker holds back an event of a patient while a running
 * transaction with a lower floor has that patient in its set; other
 * patients' events flow.  It also sends nothing above the sequence value
 * it read before looking at the floors, since a transaction that takes a
 * seq later may not have published its floor yet.  A floor is withdrawn
 * when its transaction ends.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "common/hashfn.h"
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
	pg_atomic_uint64 patients;	/* bit (hash % 64) per patient, or all */
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
			pg_atomic_init_u64(&seq_fence->floors[i].patients, 0);
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
				pg_atomic_write_u64(&seq_fence->floors[MyBackendId - 1].patients, 0);
				floor_published = false;
			}
			break;
		default:
			break;
	}
}

/*
 * The bit of a patient in a patient set; NULL stands for every patient.
 */
static uint64
patient_bit(const char *patient_id)
{
	if (patient_id == NULL)
		return PG_UINT64_MAX;
	return UINT64CONST(1) << (hash_bytes((const unsigned char *) patient_id,
										 strlen(patient_id)) % 64);
}

/*
 * Call before taking a seq for an event of a patient (NULL: of any
 * patient).  The first call of a transaction publishes its floor: the
 * sequence's value as this database's worker last read it, which is no
 * more than any seq taken from now on.  Without a worker, the floor is 0:
 * a new worker holds back what this transaction might precede.
 */
void
seq_fence_claim(const char *patient_id)
{
	static bool callback_registered = false;
	BackendFloor *mine;

	if (seq_fence == NULL)
		return;
	mine = &seq_fence->floors[MyBackendId - 1];

	if (!floor_published)
	{
		WorkerSlot *slot;
		uint64		floor = 0;

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

		mine->dboid = MyDatabaseId;
		pg_atomic_write_u64(&mine->patients, 0);
		pg_write_barrier();
		pg_atomic_write_u64(&mine->floor, floor);
		floor_published = true;
	}

	/* both must be visible before the seq they guard is taken */
	pg_atomic_fetch_or_u64(&mine->patients, patient_bit(patient_id));
	pg_memory_barrier();
}

/*
 * Take a view of the floors of this database's running transactions,
 * given the sequence's value read just before.  The value read becomes
 * the floor of the transactions that start taking seqs from now on.
 */
void
seq_fence_scan(WorkerSlot *slot, int64 sequence_value, SeqFenceView *view)
{
	view->sequence_value = Max(sequence_value, 0);
	view->count = 0;
	pg_atomic_write_u64(&slot->sequence_seen, (uint64) view->sequence_value);
	pg_memory_barrier();
	for (int i = 0; i < MaxBackends && view->count < SEQ_FENCE_MAX_VIEW; i++)
	{
		BackendFloor *other = &seq_fence->floors[i];
		uint64		floor = pg_atomic_read_u64(&other->floor);

		pg_read_barrier();
		if (floor == NO_FLOOR || other->dboid != MyDatabaseId || i == MyBackendId - 1)
			continue;
		view->floors[view->count] = floor;
		view->patients[view->count] = pg_atomic_read_u64(&other->patients);
		view->count++;
	}
	if (view->count == SEQ_FENCE_MAX_VIEW)
	{
		/* too many to track: hold everything above the lowest floor */
		view->floors[0] = 0;
		view->patients[0] = PG_UINT64_MAX;
		view->count = 1;
	}
}

/*
 * Must the event with this seq, of this patient, wait: might a running
 * transaction still commit an earlier event of the patient?
 */
bool
seq_fence_holds(const SeqFenceView *view, int64 seq, const char *patient_id)
{
	uint64		bit = patient_bit(patient_id);

	if (seq > view->sequence_value)
		return true;
	for (int i = 0; i < view->count; i++)
	{
		if (view->floors[i] < (uint64) seq && (view->patients[i] & bit) != 0)
			return true;
	}
	return false;
}
