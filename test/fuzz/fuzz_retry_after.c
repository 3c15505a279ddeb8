/*
 * libFuzzer target: the Retry-After header, parse_retry_after() (seconds
 * and HTTP-date) and the header callback collect_header() of src/http.c,
 * which is static: the source file itself is included.  Invariants: no
 * crash, the delay is -1 (not understood) or 0..86400000 ms, the header
 * callback consumes the whole line and leaves nothing allocated.
 */
#include "../../src/http.c"

#include "pg_shim.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check_delay(int64 ms)
{
	if (ms != -1 && (ms < 0 || ms > (int64) 86400 * 1000))
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char	   *value = malloc(size + 1);
	char	   *line;
	HttpResult	result;
	static const char name[] = "Retry-After:";

	/* the value alone, as collect_header hands it over */
	memcpy(value, data, size);
	value[size] = '\0';
	check_delay(parse_retry_after(value, GetCurrentTimestamp()));

	/* the raw header line as libcurl delivers it (not NUL-terminated) */
	result.retry_after_ms = -1;
	line = malloc(size ? size : 1);
	memcpy(line, data, size);
	if (collect_header(line, 1, size, &result) != size)
		abort();
	check_delay(result.retry_after_ms);
	free(line);

	/* the same bytes behind the header's name */
	line = malloc(sizeof(name) - 1 + size);
	memcpy(line, name, sizeof(name) - 1);
	memcpy(line + sizeof(name) - 1, data, size);
	result.retry_after_ms = -1;
	if (collect_header(line, 1, sizeof(name) - 1 + size, &result) != sizeof(name) - 1 + size)
		abort();
	check_delay(result.retry_after_ms);
	free(line);

	free(value);
	if (shim_live_chunks() != 0)
		abort();				/* collect_header must pfree its copy */
	return 0;
}
