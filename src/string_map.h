/*-------------------------------------------------------------------------
 *
 * string_map.h
 *		Hash tables keyed by C strings of any length.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#ifndef PORTAL_SYNC_STRING_MAP_H
#define PORTAL_SYNC_STRING_MAP_H

#include "utils/hsearch.h"

extern HTAB *string_map_create(const char *name, Size entrysize, MemoryContext context);
extern void *string_map_enter(HTAB *map, const char *string, bool *found);
extern void *string_map_find(HTAB *map, const char *string);
extern void string_map_remove(HTAB *map, const char *string);

#endif							/* PORTAL_SYNC_STRING_MAP_H */
