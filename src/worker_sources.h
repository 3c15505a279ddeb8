/*-------------------------------------------------------------------------
 *
 * worker_sources.h
 *		The delivery worker's list of attached tables, kept between units.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#ifndef PORTAL_SYNC_WORKER_SOURCES_H
#define PORTAL_SYNC_WORKER_SOURCES_H

#include "nodes/pg_list.h"

extern List *worker_sources(void);
extern void worker_sources_forget(void);
extern void worker_sources_check_snapshot(void);

#endif							/* PORTAL_SYNC_WORKER_SOURCES_H */
