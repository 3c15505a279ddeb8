/*-------------------------------------------------------------------------
 *
 * seq_fence.h
 *		Which seqs of the outbox can no longer be overtaken.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#ifndef PORTAL_SYNC_SEQ_FENCE_H
#define PORTAL_SYNC_SEQ_FENCE_H

struct WorkerSlot;

/* Most running transactions a view tracks one by one. */
#define SEQ_FENCE_MAX_VIEW 256

/* The worker's view of the floors at one moment. */
typedef struct SeqFenceView
{
	int64		sequence_value;
	int			count;
	uint64		floors[SEQ_FENCE_MAX_VIEW];
	uint64		patients[SEQ_FENCE_MAX_VIEW];
} SeqFenceView;

extern Size seq_fence_shmem_size(void);
extern void seq_fence_shmem_init(void);
extern void seq_fence_claim(const char *patient_id);
extern void seq_fence_scan(struct WorkerSlot *slot, int64 sequence_value,
						   SeqFenceView *view);
extern bool seq_fence_holds(const SeqFenceView *view, int64 seq, const char *patient_id);

#endif							/* PORTAL_SYNC_SEQ_FENCE_H */
