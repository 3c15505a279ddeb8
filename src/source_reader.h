/*-------------------------------------------------------------------------
 *
 * source_reader.h
 *		Reading the attached tables at send time.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#ifndef PORTAL_SYNC_SOURCE_READER_H
#define PORTAL_SYNC_SOURCE_READER_H

#include "executor/spi.h"
#include "nodes/pg_list.h"

#include "portal_sync.h"
#include "string_map.h"

/* An attached table as the worker reads it. */
/*
 * One statement the worker runs on an attached table, again and again: its
 * SQL, the types of its third and (if it has one) fourth parameters, and
 * its prepared statement once parsed (kept, SPI_keepplan, until the source
 * list is loaded again; planned at each run).
 */
typedef struct SourceStatement
{
	char	   *sql;
	Oid			third_type;
	Oid			fourth_type;	/* InvalidOid: three parameters */
	SPIPlanPtr	plan;
} SourceStatement;

typedef struct WorkerSource
{
	int32		source_id;
	Oid			relid;
	SourceKind	kind;
	char	   *kind_name;
	char	   *name;
	SourceStatement rows_by_key;
	SourceStatement snapshot;	/* one patient's shareable rows */
	SourceStatement snapshots;	/* many patients' shareable rows */
	SourceStatement all_keys;
	SourceStatement row_owner;	/* the patient of one row, without the rules */
	SourceStatement row_sizes;	/* the size of rows' data, by key */
	SourceStatement rows_with_sizes;	/* rows by key with their sizes, the
										 * data of the small ones */
	SourceStatement chart;		/* kind patient only */
	SourceStatement requeue_documents;	/* kind ccda only: send them again */
	bool		retracting;		/* detached with retract: deletes only, no
								 * table and no statements */
} WorkerSource;

/* A row read by key; entries of a string map keyed by the row's key. */
typedef struct SourceRow
{
	char	   *key;
	char	   *patient_id;
	bool		shareable;
	char	   *data_json;		/* when shareable */
	bool		data_unread;	/* shareable, data not read yet (large) */
} SourceRow;

/* The size of a row's data; entries of a string map keyed "source|key". */
/* A patient's rows of one source, for its snapshot */
typedef struct SnapshotRows
{
	char	   *patient_id;
	List	   *rows;			/* of SourceRow *, in key order */
} SnapshotRows;

typedef struct RowSize
{
	char	   *id;
	size_t		bytes;
} RowSize;

/* Chart privacy of a patient; entries of a string map keyed by patient. */
typedef struct ChartState
{
	char	   *patient_id;
	bool		shareable;
} ChartState;

extern int	spi_query(const char *sql, int nargs, Oid *types, Datum *values,
					  const char *nulls, bool read_only);
extern List *load_worker_sources(void);
extern void free_worker_source_plans(List *sources);
extern void set_sharing_parameters(const char *date_cutoff, int32 max_privacy_level);
extern void read_rows_by_key(WorkerSource *source, char **keys, int nkeys, HTAB *rows);
extern void read_row_sizes(WorkerSource *source, char **keys, int nkeys, HTAB *sizes);
extern bool read_rows_with_sizes(WorkerSource *source, char **keys, int nkeys,
								 size_t max_row_bytes, HTAB *rows, HTAB *sizes);
extern void read_charts(WorkerSource *chart_source, char **patient_ids, int count, HTAB *charts);
extern List *read_snapshot_rows(WorkerSource *source, const char *patient_id);
extern bool read_snapshots_rows(WorkerSource *source, char **patient_ids, int count,
								HTAB *rows_by_patient);
extern void rule_errors_reset(void);
extern void rule_errors_record(void);
extern void read_all_keys(WorkerSource *source, const char *patient_id);
extern void requeue_documents(WorkerSource *source, char **patient_ids, int count);

#endif							/* PORTAL_SYNC_SOURCE_READER_H */
