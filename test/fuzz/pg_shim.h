/*
 * pg_shim.h -- the few backend services that src/wire.c and src/http.c use,
 * for the standalone libFuzzer targets (test/fuzz/).  The sources are
 * compiled unchanged against PostgreSQL's server headers; pg_shim.c
 * provides palloc & co. on malloc, lappend, StringInfo, elog/ereport
 * (ERROR and above abort, which the fuzzer reports as a crash: these
 * parsers must never raise an error on outside input), and the clock.
 */
#ifndef PORTAL_SYNC_PG_SHIM_H
#define PORTAL_SYNC_PG_SHIM_H

#include <stddef.h>

/* Free everything palloc'd since the last call (end of one fuzz input). */
extern void shim_reset(void);
/* Number of live palloc'd chunks. */
extern size_t shim_live_chunks(void);

#endif
