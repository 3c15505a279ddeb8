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

extern Size seq_fence_shmem_size(void);
extern void seq_fence_shmem_init(void);
extern void seq_fence_claim(void);
extern int64 seq_fence_safe_seq(struct WorkerSlot *slot, int64 sequence_value);

#endif							/* PORTAL_SYNC_SEQ_FENCE_H */
