/*-------------------------------------------------------------------------
 *
 * unrecorded_writes.c
 *		Which transactions wrote rows of patients who were not enrolled.
 *
 * Capture records a patient's changes only once the patient is enrolled.
 * A transaction that wrote a row of a patient before the enrollment
 * committed recorded nothing for it, so the enrollment's snapshot must be
 * read after that transaction ends (snapshot_wait.c).  To wait only for
 * the transactions that did so for that patient, each writing transaction
 * publishes, in shared memory under its xid, a Bloom filter of the
 * patients whose rows it wrote while they were not enrolled.  A
 * transaction with no entry wrote no such row.  A false positive of the
 * filter only makes one patient's snapshot wait for one transaction
 * longer than needed; it never lets one go early.
 *
 * The entry outlives PREPARE TRANSACTION (the prepared transaction can
 * still commit); the worker drops entries of transactions that ended.
 * After a restart, the transactions prepared before it have no entry;
 * every xid older than the first one seen after the restart counts as
 * unknown, so they are waited for.  If the table is ever full, absent
 * entries count as unknown until the next restart.
 *
 * Each backend also keeps the exact set for its own transaction, so that
 * wait_ready() can tell when it would wait for itself; a wait_ready()
 * caller that wrote no unrecorded row of the patient has no bit for it
 * (but by a false positive) and is not waited for.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/transam.h"
#include "access/twophase.h"
#include "access/xact.h"
#include "common/hashfn.h"
#include "miscadmin.h"
#include "storage/lwlock.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "string_map.h"
#include "unrecorded_writes.h"

/* Bits of one transaction's filter, and how many each patient sets. */
#define FILTER_BITS			2048
#define FILTER_HASHES		3

/* Most patients remembered exactly per transaction. */
#define MAX_UNRECORDED_PATIENTS		1024

typedef struct UnrecordedWrites
{
	TransactionId xid;			/* hash key: a top-level xid */
	bool		saturated;		/* too many patients: counts as all */
	uint64		bits[FILTER_BITS / 64];
} UnrecordedWrites;

typedef struct UnrecordedShared
{
	LWLock	   *lock;
	bool		overflowed;		/* an entry could not be made */
	TransactionId known_from;	/* older xids without entry: unknown */
} UnrecordedShared;

static UnrecordedShared *unrecorded_shared = NULL;
static HTAB *unrecorded_table = NULL;

/* This backend's transaction */
static HTAB *unrecorded_patients = NULL;
static MemoryContext unrecorded_context = NULL;
static bool unrecorded_overflow = false;
static TransactionId published_xid = InvalidTransactionId;
static bool callback_registered = false;

static void publish_patient(const char *patient_id, bool saturate);
static void register_callback(void);
static void forget_transaction(XactEvent event, void *arg);

/*
 * Entries: one per transaction that may be open at once, prepared ones
 * included.
 */
static long
unrecorded_entries(void)
{
	return MaxBackends + max_prepared_xacts + 1;
}

Size
unrecorded_writes_shmem_size(void)
{
	return add_size(MAXALIGN(sizeof(UnrecordedShared)),
					hash_estimate_size(unrecorded_entries(), sizeof(UnrecordedWrites)));
}

/*
 * Set up the table; called from the shmem startup hook, with
 * AddinShmemInitLock held.
 */
void
unrecorded_writes_shmem_init(void)
{
	HASHCTL		ctl;
	bool		found;

	unrecorded_shared = ShmemInitStruct("portal_sync unrecorded writes",
										sizeof(UnrecordedShared), &found);
	if (!found)
	{
		unrecorded_shared->lock = &(GetNamedLWLockTranche("portal_sync"))[1].lock;
		unrecorded_shared->overflowed = false;
		unrecorded_shared->known_from = InvalidTransactionId;
	}
	ctl.keysize = sizeof(TransactionId);
	ctl.entrysize = sizeof(UnrecordedWrites);
	unrecorded_table = ShmemInitHash("portal_sync unrecorded writes table",
									 unrecorded_entries(), unrecorded_entries(),
									 &ctl, HASH_ELEM | HASH_BLOBS);
}

/*
 * The first xid that can have an entry: set once per server start, at the
 * first use, to the next xid then.
 */
static TransactionId
known_from(void)
{
	if (!TransactionIdIsValid(unrecorded_shared->known_from))
		unrecorded_shared->known_from = XidFromFullTransactionId(ReadNextFullTransactionId());
	return unrecorded_shared->known_from;
}

/*
 * The filter's bits for a patient.
 */
static void
patient_bits(const char *patient_id, int *bits)
{
	uint64		hash = hash_bytes_extended((const unsigned char *) patient_id,
										   strlen(patient_id), 0);
	uint32		h1 = (uint32) hash;
	uint32		h2 = (uint32) (hash >> 32) | 1;

	for (int i = 0; i < FILTER_HASHES; i++)
		bits[i] = (int) ((h1 + (uint32) i * h2) % FILTER_BITS);
}

static void
register_callback(void)
{
	if (!callback_registered)
	{
		RegisterXactCallback(forget_transaction, NULL);
		callback_registered = true;
	}
}

/*
 * At commit or abort, withdraw the transaction's entry (a prepared one
 * keeps it) and forget its exact set.
 */
static void
forget_transaction(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PARALLEL_ABORT:
			if (TransactionIdIsValid(published_xid))
			{
				LWLockAcquire(unrecorded_shared->lock, LW_EXCLUSIVE);
				(void) hash_search(unrecorded_table, &published_xid, HASH_REMOVE, NULL);
				LWLockRelease(unrecorded_shared->lock);
			}
			/* FALLTHROUGH */
		case XACT_EVENT_PREPARE:
			published_xid = InvalidTransactionId;
			if (unrecorded_context != NULL)
			{
				MemoryContextDelete(unrecorded_context);
				unrecorded_context = NULL;
				unrecorded_patients = NULL;
			}
			unrecorded_overflow = false;
			break;
		default:
			break;
	}
}

/*
 * Capture is about to ask whether a patient is enrolled, for a row the
 * current transaction wrote: add the patient to the transaction's shared
 * filter first.  Before the question, not after the answer, so that there
 * is no moment at which the row is unrecorded and the filter does not say
 * so: an enrollment committed after the question is seen by the worker
 * only later, and then the filter holds the patient.
 */
void
announce_unrecorded_candidate(const char *patient_id)
{
	publish_patient(patient_id, false);
}

/*
 * Add a patient to the transaction's shared filter.
 */
static void
publish_patient(const char *patient_id, bool saturate)
{
	TransactionId xid = GetTopTransactionId();
	UnrecordedWrites *entry;
	bool		found;
	int			bits[FILTER_HASHES];

	if (unrecorded_shared == NULL)
		return;
	register_callback();
	patient_bits(patient_id, bits);
	LWLockAcquire(unrecorded_shared->lock, LW_EXCLUSIVE);
	(void) known_from();
	entry = hash_search(unrecorded_table, &xid, HASH_ENTER_NULL, &found);
	if (entry == NULL)
		unrecorded_shared->overflowed = true;
	else
	{
		if (!found)
		{
			entry->saturated = false;
			memset(entry->bits, 0, sizeof(entry->bits));
		}
		if (saturate)
			entry->saturated = true;
		for (int i = 0; i < FILTER_HASHES; i++)
			entry->bits[bits[i] / 64] |= UINT64CONST(1) << (bits[i] % 64);
		published_xid = xid;
	}
	LWLockRelease(unrecorded_shared->lock);
}

/*
 * Capture wrote a row of a patient who is not enrolled, without recording
 * it.  Called once per patient per statement.
 */
void
note_unrecorded_patient(const char *patient_id)
{
	bool		found;

	register_callback();
	if (unrecorded_overflow)
		return;
	if (unrecorded_patients == NULL)
	{
		unrecorded_context = AllocSetContextCreate(TopMemoryContext,
												   "portal_sync unrecorded patients",
												   ALLOCSET_SMALL_SIZES);
		unrecorded_patients = string_map_create("portal_sync unrecorded patients",
												sizeof(char *), unrecorded_context);
	}
	if (string_map_find(unrecorded_patients, patient_id) != NULL)
		return;
	if (hash_get_num_entries(unrecorded_patients) >= MAX_UNRECORDED_PATIENTS)
	{
		unrecorded_overflow = true;
		return;
	}
	(void) string_map_enter(unrecorded_patients,
							MemoryContextStrdup(unrecorded_context, patient_id),
							&found);
}

/*
 * Did the current transaction write rows of the patient while the patient
 * was not enrolled (or too many patients to tell)?
 */
bool
wrote_unrecorded_rows_of(const char *patient_id)
{
	if (unrecorded_overflow)
		return true;
	return unrecorded_patients != NULL &&
		string_map_find(unrecorded_patients, patient_id) != NULL;
}

/*
 * Might the running transaction xid have written rows of the patient
 * without recording them?  For the worker.
 */
bool
transaction_may_have_unrecorded(TransactionId xid, const char *patient_id)
{
	UnrecordedWrites *entry;
	bool		result;
	int			bits[FILTER_HASHES];

	if (unrecorded_shared == NULL)
		return true;
	patient_bits(patient_id, bits);
	LWLockAcquire(unrecorded_shared->lock, LW_SHARED);
	entry = hash_search(unrecorded_table, &xid, HASH_FIND, NULL);
	if (entry == NULL)
		result = unrecorded_shared->overflowed ||
			!TransactionIdIsValid(unrecorded_shared->known_from) ||
			TransactionIdPrecedes(xid, unrecorded_shared->known_from);
	else if (entry->saturated)
		result = true;
	else
	{
		result = true;
		for (int i = 0; i < FILTER_HASHES; i++)
			if ((entry->bits[bits[i] / 64] & (UINT64CONST(1) << (bits[i] % 64))) == 0)
				result = false;
	}
	LWLockRelease(unrecorded_shared->lock);
	return result;
}

/*
 * Drop the entries of transactions that ended without their backend
 * withdrawing them: prepared transactions committed or rolled back later,
 * backends that died.  For the worker; also starts the "known from" xid.
 */
void
forget_ended_unrecorded_writes(void)
{
	HASH_SEQ_STATUS status;
	UnrecordedWrites *entry;
	TransactionId ended[64];
	int			nended = 0;

	if (unrecorded_shared == NULL)
		return;
	LWLockAcquire(unrecorded_shared->lock, LW_EXCLUSIVE);
	(void) known_from();
	LWLockRelease(unrecorded_shared->lock);

	LWLockAcquire(unrecorded_shared->lock, LW_SHARED);
	hash_seq_init(&status, unrecorded_table);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (nended < lengthof(ended) && !TransactionIdIsInProgress(entry->xid))
			ended[nended++] = entry->xid;
	}
	LWLockRelease(unrecorded_shared->lock);

	if (nended == 0)
		return;
	LWLockAcquire(unrecorded_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < nended; i++)
		(void) hash_search(unrecorded_table, &ended[i], HASH_REMOVE, NULL);
	LWLockRelease(unrecorded_shared->lock);
}
