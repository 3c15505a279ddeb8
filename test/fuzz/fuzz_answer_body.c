/*
 * libFuzzer target: the portal's answer body, as libcurl hands it to the
 * static body collector collect_body() of src/http.c (the source file is
 * included) in pieces, then read by parse_answer_body() of src/wire.c.
 * The first input byte sets the piece size.  Invariants: no crash, no
 * leak, the collected body equals the input, every rejected entry has an
 * event_id and a reason of at most 500 bytes.
 */
#include "../../src/http.c"

#include "pg_shim.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	HttpResult	result;
	size_t		piece;
	List	   *rejected;
	ListCell   *lc;

	if (size == 0)
		return 0;
	piece = 1 + data[0] % 64;
	data++;
	size--;

	memset(&result, 0, sizeof(result));
	for (size_t at = 0; at < size; at += piece)
	{
		size_t		n = Min(piece, size - at);
		char	   *copy = malloc(n);	/* not NUL-terminated, like libcurl's */

		memcpy(copy, data + at, n);
		if (collect_body(copy, 1, n, &result) != n)
			abort();
		free(copy);
	}
	if (result.body.incomplete || result.body.len != size ||
		(size > 0 && memcmp(result.body.data, data, size) != 0))
		abort();

	(void) parse_answer_body(result.body.data, result.body.len, &rejected);
	foreach(lc, rejected)
	{
		RejectedEvent *entry = lfirst(lc);

		if (entry->event_id == NULL)
			abort();
		if (entry->reason != NULL && strlen(entry->reason) > 500)
			abort();
	}
	http_result_free(&result);
	shim_reset();
	return 0;
}
