/*
 * libFuzzer target: the portal's 2xx response body, parse_rejected_list()
 * of src/wire.c.  The body is handed over exactly as collected (not
 * NUL-terminated here, so an over-read is caught).  Invariants: no crash,
 * no leak (json-c objects and palloc'd entries), every entry has an
 * event_id and a reason of at most 500 bytes.
 */
#include "postgres.h"

#include "delivery.h"
#include "pg_shim.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char	   *body = malloc(size ? size : 1);
	List	   *rejected;
	ListCell   *lc;

	memcpy(body, data, size);
	rejected = parse_rejected_list(body, size);
	foreach(lc, rejected)
	{
		RejectedEvent *entry = lfirst(lc);

		if (entry->event_id == NULL)
			abort();
		if (entry->reason != NULL && strlen(entry->reason) > 500)
			abort();
	}
	free(body);
	shim_reset();
	return 0;
}
