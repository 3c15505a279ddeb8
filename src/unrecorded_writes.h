/*-------------------------------------------------------------------------
 *
 * unrecorded_writes.h
 *		Which transactions wrote rows of patients who were not enrolled.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#ifndef PORTAL_SYNC_UNRECORDED_WRITES_H
#define PORTAL_SYNC_UNRECORDED_WRITES_H

extern Size unrecorded_writes_shmem_size(void);
extern void unrecorded_writes_shmem_init(void);

extern void announce_unrecorded_candidate(const char *patient_id);
extern void note_unrecorded_patient(const char *patient_id);
extern bool wrote_unrecorded_rows_of(const char *patient_id);
extern bool transaction_may_have_unrecorded(TransactionId xid, const char *patient_id);
extern void forget_ended_unrecorded_writes(void);

#endif							/* PORTAL_SYNC_UNRECORDED_WRITES_H */
