/*-------------------------------------------------------------------------
 *
 * source_reader.c
 *		Reading the attached tables at send time, with the sharing rules.
 *
 * The worker never trusts a copy: it reads each row as it is when the
 * event is sent and decides there whether it is shareable (date cutoff,
 * privacy level, share_when).  The statements are generated per source
 * from the catalog: identifiers through quote_identifier, values through
 * parameters, the rule through pg_get_expr of its analyzed form.  The
 * worker's search_path holds only pg_catalog, so the deparsed rule means
 * what it meant when it was attached.
 *
 * Parameters of every statement here: $1 the date cutoff (date, may be
 * NULL), $2 max_privacy_level (int), $3 the keys or patient ids (text[] or
 * text).
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "source_reader.h"

/*
 * SPI_execute_with_args that leaves the caller in its own memory context:
 * SPI returns in its procedure context, which SPI_finish frees, and the
 * worker keeps what it reads in the unit's context.
 */
int
spi_query(const char *sql, int nargs, Oid *types, Datum *values,
		  const char *nulls, bool read_only)
{
	MemoryContext caller = CurrentMemoryContext;
	int			ret = SPI_execute_with_args(sql, nargs, types, values, nulls, read_only, 0);

	MemoryContextSwitchTo(caller);
	return ret;
}

/* Settings of the current unit's statements. */
static Datum rule_values[2];
static char rule_nulls[3] = "   ";

/*
 * The boolean SQL expression saying whether row "t" of a source is
 * shareable, or "true".
 */
static char *
shareable_sql(const char *date_col, const char *privacy_col, const char *share_when)
{
	StringInfoData sql;

	initStringInfo(&sql);
	appendStringInfoString(&sql, "(true");
	if (date_col != NULL)
		appendStringInfo(&sql, " AND ($1 IS NULL OR t.%s IS NULL OR t.%s::pg_catalog.date >= $1)",
						 quote_identifier(date_col), quote_identifier(date_col));
	if (privacy_col != NULL)
		appendStringInfo(&sql, " AND COALESCE(t.%s, 0) <= $2", quote_identifier(privacy_col));
	if (share_when != NULL)
		appendStringInfo(&sql, " AND COALESCE((%s), false)", share_when);
	appendStringInfoChar(&sql, ')');
	return sql.data;
}

/*
 * The SQL that turns row "t" into a JSON object, given its column names.
 * Naming the columns (json_build_object) rather than the whole row
 * (to_json(t)) keeps the executor from copying the whole detoasted row:
 * with a C-CDA document of megabytes that copy is the size of the
 * document.  The output is the same.  A function takes at most 100
 * arguments, so wide tables use to_json(t).
 */
static char *
row_json_sql(Datum column_names)
{
	Datum	   *names;
	int			count;
	StringInfoData sql;

	deconstruct_array(DatumGetArrayTypeP(column_names), TEXTOID, -1, false,
					  TYPALIGN_INT, &names, NULL, &count);
	if (count == 0 || count * 2 > FUNC_MAX_ARGS)
		return "pg_catalog.to_json(t)::pg_catalog.text";

	initStringInfo(&sql);
	appendStringInfoString(&sql, "pg_catalog.json_build_object(");
	for (int i = 0; i < count; i++)
	{
		char	   *name = TextDatumGetCString(names[i]);

		if (i > 0)
			appendStringInfoString(&sql, ", ");
		appendStringInfo(&sql, "%s, t.%s", quote_literal_cstr(name), quote_identifier(name));
	}
	appendStringInfoString(&sql, ")::pg_catalog.text");
	return sql.data;
}

/*
 * Read the attached tables' settings and generate their statements, in
 * the current memory context.
 */
List *
load_worker_sources(void)
{
	List	   *sources = NIL;
	int			ret;

	ret = spi_query("SELECT s.source_id, s.kind, s.name, n.nspname, c.relname,"
					  " pa.attname, pg_catalog.format_type(pa.atttypid, NULL),"
					  " ka.attname, pg_catalog.format_type(ka.atttypid, NULL),"
					  " da.attname, va.attname, pg_catalog.pg_get_expr(s.share_when, s.relid),"
					  " ARRAY(SELECT a.attname FROM pg_catalog.pg_attribute a"
					  "       WHERE a.attrelid = s.relid AND a.attnum > 0 AND NOT a.attisdropped"
					  "       ORDER BY a.attnum)::pg_catalog.text[]"
					  " FROM portal_sync.source s"
					  " JOIN pg_catalog.pg_class c ON c.oid = s.relid"
					  " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
					  " JOIN pg_catalog.pg_attribute pa ON pa.attrelid = s.relid AND pa.attnum = s.patient_attnum"
					  " JOIN pg_catalog.pg_attribute ka ON ka.attrelid = s.relid AND ka.attnum = s.key_attnum"
					  " LEFT JOIN pg_catalog.pg_attribute da ON da.attrelid = s.relid AND da.attnum = s.date_attnum"
					  " LEFT JOIN pg_catalog.pg_attribute va ON va.attrelid = s.relid AND va.attnum = s.privacy_attnum"
					  " ORDER BY s.source_id",
					  0, NULL, NULL, NULL, true);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading portal_sync.source failed: %s", SPI_result_code_string(ret));

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		WorkerSource *source = palloc0(sizeof(WorkerSource));
		bool		isnull;
		char	   *kind = SPI_getvalue(tuple, desc, 2);
		char	   *rel = quote_qualified_identifier(SPI_getvalue(tuple, desc, 4),
													 SPI_getvalue(tuple, desc, 5));
		const char *patient_col = quote_identifier(SPI_getvalue(tuple, desc, 6));
		char	   *patient_type = SPI_getvalue(tuple, desc, 7);
		const char *key_col = quote_identifier(SPI_getvalue(tuple, desc, 8));
		char	   *key_type = SPI_getvalue(tuple, desc, 9);
		char	   *date_col = SPI_getvalue(tuple, desc, 10);
		char	   *privacy_col = SPI_getvalue(tuple, desc, 11);
		char	   *shareable = shareable_sql(date_col, privacy_col, SPI_getvalue(tuple, desc, 12));
		char	   *row_json = row_json_sql(SPI_getbinval(tuple, desc, 13, &isnull));

		source->source_id = pg_strtoint32(SPI_getvalue(tuple, desc, 1));
		source->kind_name = kind;
		if (!source_kind_from_name(kind, &source->kind))
			elog(ERROR, "portal_sync.source holds an unknown kind");
		source->name = SPI_getvalue(tuple, desc, 3);

		source->rows_by_key_sql =
			psprintf("SELECT t.%s::pg_catalog.text, t.%s::pg_catalog.text, %s,"
					 " CASE WHEN %s THEN %s END"
					 " FROM %s t WHERE t.%s = ANY ($3::pg_catalog.text[]::%s[])",
					 key_col, patient_col, shareable, shareable, row_json,
					 rel, key_col, key_type);
		source->snapshot_sql =
			psprintf("SELECT t.%s::pg_catalog.text, %s"
					 " FROM %s t WHERE t.%s = $3::pg_catalog.text::%s AND %s ORDER BY t.%s",
					 key_col, row_json, rel, patient_col, patient_type, shareable, key_col);
		source->all_keys_sql =
			psprintf("SELECT t.%s::pg_catalog.text FROM %s t"
					 " WHERE t.%s = $3::pg_catalog.text::%s ORDER BY t.%s",
					 key_col, rel, patient_col, patient_type, key_col);
		if (source->kind == SOURCE_PATIENT)
			source->chart_sql =
				psprintf("SELECT t.%s::pg_catalog.text, %s FROM %s t"
						 " WHERE t.%s = ANY ($3::pg_catalog.text[]::%s[])",
						 patient_col,
						 privacy_col ? psprintf("COALESCE(t.%s, 0) <= $2", quote_identifier(privacy_col)) : "true",
						 rel, patient_col, patient_type);
		sources = lappend(sources, source);
	}
	return sources;
}

/*
 * Set the rule parameters used by the statements of this unit.
 */
void
set_sharing_parameters(const char *date_cutoff, int32 max_privacy_level)
{
	if (date_cutoff != NULL)
	{
		rule_values[0] = DirectFunctionCall1(date_in, CStringGetDatum(date_cutoff));
		rule_nulls[0] = ' ';
	}
	else
	{
		rule_values[0] = (Datum) 0;
		rule_nulls[0] = 'n';
	}
	rule_values[1] = Int32GetDatum(max_privacy_level);
}

/*
 * Build a text[] datum from C strings.
 */
static Datum
text_array(char **strings, int count)
{
	Datum	   *elements = palloc(count * sizeof(Datum));

	for (int i = 0; i < count; i++)
		elements[i] = CStringGetTextDatum(strings[i]);
	return PointerGetDatum(construct_array(elements, count, TEXTOID, -1, false, TYPALIGN_INT));
}

/*
 * Run one of a source's statements with the rule parameters and $3.
 */
static void
run_source_statement(const char *sql, Oid third_type, Datum third)
{
	Oid			types[3] = {DATEOID, INT4OID, third_type};
	Datum		values[3] = {rule_values[0], rule_values[1], third};
	int			ret;

	ret = spi_query(sql, 3, types, values, rule_nulls, true);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading an attached table failed: %s", SPI_result_code_string(ret));
}

/*
 * Read the rows with these keys of a source: fills the map (entries are
 * SourceRow, keyed by key) in the current memory context.
 */
void
read_rows_by_key(WorkerSource *source, char **keys, int nkeys, HTAB *rows)
{
	run_source_statement(source->rows_by_key_sql, TEXTARRAYOID, text_array(keys, nkeys));

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *key = SPI_getvalue(tuple, desc, 1);
		bool		found;
		SourceRow  *row = string_map_enter(rows, key, &found);
		char	   *shareable = SPI_getvalue(tuple, desc, 3);

		row->patient_id = SPI_getvalue(tuple, desc, 2);
		row->shareable = shareable != NULL && shareable[0] == 't';
		row->data_json = row->shareable ? SPI_getvalue(tuple, desc, 4) : NULL;
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Is each patient's chart shareable?  Fills the map (entries are
 * ChartState, keyed by patient id) for the patients that have a chart row.
 */
void
read_charts(WorkerSource *chart_source, char **patient_ids, int count, HTAB *charts)
{
	run_source_statement(chart_source->chart_sql, TEXTARRAYOID, text_array(patient_ids, count));

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		found;
		ChartState *chart = string_map_enter(charts, SPI_getvalue(tuple, desc, 1), &found);
		char	   *ok = SPI_getvalue(tuple, desc, 2);

		/* Two chart rows for one patient: restricted if either is. */
		chart->shareable = (found ? chart->shareable : true) && ok != NULL && ok[0] == 't';
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Read the shareable rows of a patient in a source, for a snapshot; the
 * caller walks SPI_tuptable (key, data) and frees it.
 */
void
read_snapshot_rows(WorkerSource *source, const char *patient_id)
{
	run_source_statement(source->snapshot_sql, TEXTOID, CStringGetTextDatum(patient_id));
}

/*
 * Read the keys of all rows of a patient in a source; the caller walks
 * SPI_tuptable (key) and frees it.
 */
void
read_all_keys(WorkerSource *source, const char *patient_id)
{
	run_source_statement(source->all_keys_sql, TEXTOID, CStringGetTextDatum(patient_id));
}

