/*
 * pg_shim.c -- backend stand-ins for the libFuzzer targets; see pg_shim.h.
 */
#include "postgres.h"

#include <stdarg.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/ipc.h"
#include "storage/pmsignal.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "pg_shim.h"

/* ---------------------------------------------------------------- memory */

typedef struct Chunk
{
	struct Chunk *prev;
	struct Chunk *next;
	size_t		size;
	max_align_t align[];		/* payload follows, maximally aligned */
} Chunk;

static Chunk head = {&head, &head, 0};
static size_t live = 0;

#define CHUNK_OF(p) ((Chunk *) ((char *) (p) - offsetof(Chunk, align)))

static void *
chunk_alloc(size_t size, bool zero)
{
	Chunk	   *c;

	if (size > MaxAllocSize)
		abort();				/* palloc would raise ERROR */
	c = zero ? calloc(1, offsetof(Chunk, align) + size) :
		malloc(offsetof(Chunk, align) + size);
	if (c == NULL)
		abort();
	c->size = size;
	c->next = head.next;
	c->prev = &head;
	head.next->prev = c;
	head.next = c;
	live++;
	return c->align;
}

static void
chunk_unlink(Chunk *c)
{
	c->prev->next = c->next;
	c->next->prev = c->prev;
	live--;
}

void *
palloc(Size size)
{
	return chunk_alloc(size, false);
}

void *
palloc0(Size size)
{
	return chunk_alloc(size, true);
}

void *
palloc_extended(Size size, int flags)
{
	return chunk_alloc(size, (flags & MCXT_ALLOC_ZERO) != 0);
}

void
pfree(void *pointer)
{
	Chunk	   *c = CHUNK_OF(pointer);

	chunk_unlink(c);
	free(c);
}

void *
repalloc(void *pointer, Size size)
{
	Chunk	   *c = CHUNK_OF(pointer);
	void	   *copy = chunk_alloc(size, false);

	memcpy(copy, pointer, Min(size, c->size));
	pfree(pointer);
	return copy;
}

char *
pstrdup(const char *in)
{
	size_t		len = strlen(in);
	char	   *out = palloc(len + 1);

	memcpy(out, in, len + 1);
	return out;
}

char *
pnstrdup(const char *in, Size len)
{
	char	   *out;

	len = strnlen(in, len);
	out = palloc(len + 1);
	memcpy(out, in, len);
	out[len] = '\0';
	return out;
}

char *
psprintf(const char *fmt,...)
{
	va_list		args;
	int			len;
	char	   *out;

	va_start(args, fmt);
	len = vsnprintf(NULL, 0, fmt, args);
	va_end(args);
	if (len < 0)
		abort();
	out = palloc(len + 1);
	va_start(args, fmt);
	vsnprintf(out, len + 1, fmt, args);
	va_end(args);
	return out;
}

void
shim_reset(void)
{
	while (head.next != &head)
	{
		Chunk	   *c = head.next;

		chunk_unlink(c);
		free(c);
	}
}

size_t
shim_live_chunks(void)
{
	return live;
}

/* ---------------------------------------------------------------- List */

List *
lappend(List *list, void *datum)
{
	if (list == NIL)
	{
		list = palloc(offsetof(List, initial_elements) + 4 * sizeof(ListCell));
		list->type = T_List;
		list->length = 0;
		list->max_length = 4;
		list->elements = list->initial_elements;
	}
	else if (list->length == list->max_length)
	{
		ListCell   *cells = palloc(2 * list->max_length * sizeof(ListCell));

		memcpy(cells, list->elements, list->length * sizeof(ListCell));
		if (list->elements != list->initial_elements)
			pfree(list->elements);
		list->elements = cells;
		list->max_length *= 2;
	}
	list->elements[list->length++].ptr_value = datum;
	return list;
}

/* ---------------------------------------------------------------- StringInfo */

void
initStringInfo(StringInfo str)
{
	str->data = palloc(1024);
	str->maxlen = 1024;
	resetStringInfo(str);
}

void
resetStringInfo(StringInfo str)
{
	str->data[0] = '\0';
	str->len = 0;
	str->cursor = 0;
}

void
enlargeStringInfo(StringInfo str, int needed)
{
	int			newlen;

	if (needed < 0 || ((Size) needed) >= (MaxAllocSize - (Size) str->len))
		abort();
	needed += str->len + 1;
	if (needed <= str->maxlen)
		return;
	newlen = 2 * str->maxlen;
	while (needed > newlen)
		newlen = 2 * newlen;
	str->data = repalloc(str->data, newlen);
	str->maxlen = newlen;
}

void
appendBinaryStringInfo(StringInfo str, const char *data, int datalen)
{
	enlargeStringInfo(str, datalen);
	memcpy(str->data + str->len, data, datalen);
	str->len += datalen;
	str->data[str->len] = '\0';
}

/* ---------------------------------------------------------------- elog */

static int	current_elevel;

bool
errstart(int elevel, const char *domain)
{
	current_elevel = elevel;
	return true;
}

bool
errstart_cold(int elevel, const char *domain)
{
	return errstart(elevel, domain);
}

void
errfinish(const char *filename, int lineno, const char *funcname)
{
	if (current_elevel >= ERROR)
	{
		fprintf(stderr, "shim: ereport(ERROR) at %s:%d (%s)\n", filename, lineno, funcname);
		abort();
	}
}

int
errmsg_internal(const char *fmt,...)
{
	return 0;
}

int
errmsg(const char *fmt,...)
{
	return 0;
}

int
errcode(int sqlerrcode)
{
	return 0;
}

/* ---------------------------------------------------------------- misc */

volatile sig_atomic_t ProcDiePending = false;
volatile sig_atomic_t QueryCancelPending = false;

/* http.c stops its requests when the postmaster dies: it never does here. */
volatile sig_atomic_t postmaster_possibly_dead = false;

bool
PostmasterIsAliveInternal(void)
{
	return true;
}

void
proc_exit(int code)
{
	exit(code);
}

/* A fixed "now" keeps the Retry-After target deterministic. */
TimestampTz
GetCurrentTimestamp(void)
{
	/* 2026-01-01 00:00:00 UTC, in microseconds since 2000-01-01 */
	return (TimestampTz) 820454400 * USECS_PER_SEC;
}

pg_time_t
timestamptz_to_time_t(TimestampTz t)
{
	return (pg_time_t) (t / USECS_PER_SEC +
						((POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY));
}
