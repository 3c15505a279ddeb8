/*-------------------------------------------------------------------------
 *
 * snapshot_wait.c
 *		Which enrollment snapshots must still wait, and for whom.
 *
 * Capture records a patient's changes only once the patient is enrolled,
 * and checks that with the latest committed state.  A transaction that
 * wrote a row of a patient before the patient's enrollment committed
 * recorded nothing for it; when it commits, that row is only on the portal
 * if the patient's snapshot is read after it.  So the snapshot of an
 * enrollment waits for the writing transactions (those with an xid,
 * prepared ones included) that were in progress when the worker first saw
 * the enrollment, which is after it committed, and that may have written
 * an unrecorded row of that patient (unrecorded_writes.c): a superset of
 * the ones that matter.  Read-only and idle transactions have no xid and
 * are never waited for; nor are writers of other patients.  Only that patient waits: its other events that retract
 * something still flow, everyone else's flow as usual.
 *
 * The wait list is the in-progress set of the snapshot the worker read the
 * enrollment with (its xip array), so it is exact with respect to what that
 * snapshot could not see.  A transaction is done when
 * TransactionIdIsInProgress says so; the unit that serves the snapshot
 * takes its own snapshot after that check, so it sees what they committed.
 * The list lives in the worker's memory: after a restart the worker looks
 * again, which yields a superset again.
 *
 * So a caller of portal_sync.wait_ready() that never wrote an unrecorded
 * row of the patient it waits for is not waited for either: it would
 * otherwise wait for itself.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "lib/stringinfo.h"
#include "storage/procarray.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapshot.h"
#include "utils/timestamp.h"

#include "delivery.h"
#include "unrecorded_writes.h"
#include "string_map.h"

typedef struct SnapshotWait
{
	char	   *patient_id;		/* key */
	int			nxids;
	TransactionId *xids;		/* still running, as of the last refresh */
	TimestampTz since;
} SnapshotWait;

static HTAB *snapshot_waits = NULL;

/*
 * Before a unit takes its snapshot: forget the transactions that ended.
 * Checked before, so that the unit's snapshot sees what they committed.
 */
void
snapshot_waits_refresh(void)
{
	HASH_SEQ_STATUS status;
	SnapshotWait *wait;

	forget_ended_unrecorded_writes();
	if (snapshot_waits == NULL)
		return;
	hash_seq_init(&status, snapshot_waits);
	while ((wait = hash_seq_search(&status)) != NULL)
	{
		int			kept = 0;

		for (int i = 0; i < wait->nxids; i++)
		{
			TransactionId xid = wait->xids[i];

			if (TransactionIdIsInProgress(xid) &&
				transaction_may_have_unrecorded(xid, wait->patient_id))
				wait->xids[kept++] = xid;
		}
		wait->nxids = kept;
	}
}

/*
 * May the enrollment snapshot of this patient be read with this snapshot?
 * On first sight the wait list is taken from the snapshot's in-progress
 * transactions; true once it is empty.
 */
bool
snapshot_wait_passed(const char *patient_id, Snapshot snapshot)
{
	SnapshotWait *wait;
	bool		found;

	if (snapshot_waits == NULL)
		snapshot_waits = string_map_create("portal_sync snapshot waits",
										   sizeof(SnapshotWait), TopMemoryContext);

	wait = string_map_find(snapshot_waits, patient_id);
	if (wait != NULL)
		return wait->nxids == 0;

	/* first sight */
	{
		TransactionId *xids = NULL;
		int			nxids = 0;

		for (uint32 i = 0; i < snapshot->xcnt; i++)
		{
			TransactionId xid = snapshot->xip[i];

			if (!transaction_may_have_unrecorded(xid, patient_id))
				continue;
			if (xids == NULL)
				xids = MemoryContextAlloc(TopMemoryContext,
										  snapshot->xcnt * sizeof(TransactionId));
			xids[nxids++] = xid;
		}
		if (nxids == 0)
			return true;		/* nobody could still commit a missed row */

		wait = string_map_enter(snapshot_waits,
								MemoryContextStrdup(TopMemoryContext, patient_id),
								&found);
		wait->xids = xids;
		wait->nxids = nxids;
		wait->since = GetCurrentTimestamp();
	}
	return false;
}

/*
 * The patient's enrollment snapshot was served: forget its wait.
 */
void
snapshot_wait_done(const char *patient_id)
{
	SnapshotWait *wait;
	char	   *key;

	if (snapshot_waits == NULL)
		return;
	wait = string_map_find(snapshot_waits, patient_id);
	if (wait == NULL)
		return;
	key = wait->patient_id;
	if (wait->xids != NULL)
		pfree(wait->xids);
	string_map_remove(snapshot_waits, patient_id);
	pfree(key);
}

/*
 * Is this patient's enrollment snapshot waiting now?
 */
bool
snapshot_wait_pending(const char *patient_id)
{
	SnapshotWait *wait;

	if (snapshot_waits == NULL)
		return false;
	wait = string_map_find(snapshot_waits, patient_id);
	return wait != NULL && wait->nxids > 0;
}

/*
 * A line for portal_sync.status: how many snapshots wait, for which
 * transactions (by xid; never a patient id, which status may not show to
 * every role).  Empty when none waits.
 */
void
snapshot_waits_describe(char *buffer, size_t size)
{
	HASH_SEQ_STATUS status;
	SnapshotWait *wait;
	int			waiting = 0;
	TransactionId example = InvalidTransactionId;

	buffer[0] = '\0';
	if (snapshot_waits == NULL)
		return;
	hash_seq_init(&status, snapshot_waits);
	while ((wait = hash_seq_search(&status)) != NULL)
	{
		if (wait->nxids == 0)
			continue;
		waiting++;
		if (!TransactionIdIsValid(example))
			example = wait->xids[0];
	}
	if (waiting > 0)
		snprintf(buffer, size,
				 "%d enrollment snapshot(s) wait for writing transactions open at enrollment (xid %u, see pg_stat_activity.backend_xid or pg_prepared_xacts)",
				 waiting, example);
}
