/*-------------------------------------------------------------------------
 *
 * string_map.c
 *		Hash tables keyed by C strings of any length.
 *
 * dynahash's HASH_STRINGS wants a fixed key size; these tables key on a
 * pointer to the string instead, so an identifier of any length fits.
 * Every entry starts with that pointer, and the caller keeps the string
 * alive as long as the table.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"

#include "string_map.h"

/*
 * Hash of the string a key points to.
 */
static uint32
string_pointer_hash(const void *key, Size keysize)
{
	const char *string = *(const char *const *) key;

	return string_hash(string, strlen(string) + 1);
}

/*
 * Compare the strings two keys point to.
 */
static int
string_pointer_match(const void *key1, const void *key2, Size keysize)
{
	return strcmp(*(const char *const *) key1, *(const char *const *) key2);
}

/*
 * Create a table whose entries are entrysize bytes, starting with a char *.
 */
HTAB *
string_map_create(const char *name, Size entrysize, MemoryContext context)
{
	HASHCTL		ctl;

	ctl.keysize = sizeof(char *);
	ctl.entrysize = entrysize;
	ctl.hash = string_pointer_hash;
	ctl.match = string_pointer_match;
	ctl.hcxt = context;
	return hash_create(name, 256, &ctl,
					   HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
}

/*
 * Find the entry of a string, or create it with its key pointing to the
 * string; *found says which.
 */
void *
string_map_enter(HTAB *map, const char *string, bool *found)
{
	return hash_search(map, &string, HASH_ENTER, found);
}

/*
 * Find the entry of a string, or NULL.
 */
void *
string_map_find(HTAB *map, const char *string)
{
	return hash_search(map, &string, HASH_FIND, NULL);
}

/*
 * Remove the entry of a string, if any; the string the key points to is
 * the caller's to free.
 */
void
string_map_remove(HTAB *map, const char *string)
{
	(void) hash_search(map, &string, HASH_REMOVE, NULL);
}
