/*-------------------------------------------------------------------------
 *
 * source_reader.c
 *		Reading the attached tables at send time, with the sharing rules.
 *
 * The worker never trusts a copy: it reads each row as it is when the
 * event is sent and decides there whether it is shareable (date cutoff,
 * privacy level, share_when).  The statements are generated per source
 * from the catalog: identifiers through quote_identifier, values through
 * parameters, the rule as its stored text is analyzed again (checked as
 * attach() checks it) and deparsed: never the stored text as it is.  The
 * worker's search_path holds only pg_catalog, and the text names every
 * other schema, so the rule means what it meant when it was attached.
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

#include "access/htup_details.h"
#include "access/relation.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

#include "source_reader.h"

/* A statement of the worker's own, by its text, with its kept plan. */
typedef struct KeptStatement
{
	char	   *sql;			/* key */
	SPIPlanPtr	plan;
} KeptStatement;

static HTAB *kept_statements = NULL;

/*
 * Run one of the worker's own statements (always the same text, on the
 * extension's tables) with a plan prepared on first use and kept: they
 * run for every unit and batch, and parsing and planning them each time
 * was a fifth of the worker's time.  What is kept is the parsed and
 * analyzed statement: it is planned again at each run (a custom plan),
 * for the tables as large as they are now.  A statement without
 * parameters would get one plan for good (the plan cache makes custom
 * plans only for parameters), so it is planned afresh instead: a plan of
 * the enrollment settling kept from when the outbox and the enrollments
 * were empty stayed until autovacuum analyzed them, and a go-live's
 * second 5,000 patients took 80 s instead of 1.  Leaves the caller in its own memory context:
 * SPI returns in its procedure context, which SPI_finish frees, and the
 * worker keeps what it reads in the unit's context.
 */
int
spi_query(const char *sql, int nargs, Oid *types, Datum *values,
		  const char *nulls, bool read_only)
{
	MemoryContext caller = CurrentMemoryContext;
	KeptStatement *statement;
	bool		found;
	int			ret;

	if (nargs == 0)
	{
		ret = SPI_execute(sql, read_only, 0);
		MemoryContextSwitchTo(caller);
		return ret;
	}
	if (kept_statements == NULL)
		kept_statements = string_map_create("portal_sync kept statements",
											sizeof(KeptStatement), TopMemoryContext);
	statement = string_map_find(kept_statements, sql);
	if (statement == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, types, CURSOR_OPT_CUSTOM_PLAN);

		if (plan == NULL)
			elog(ERROR, "preparing a statement failed: %s", SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "keeping a plan failed");
		statement = string_map_enter(kept_statements,
									 MemoryContextStrdup(TopMemoryContext, sql), &found);
		statement->plan = plan;
	}
	ret = SPI_execute_plan(statement->plan, values, nulls, read_only, 0);
	MemoryContextSwitchTo(caller);
	return ret;
}

/* Settings of the current unit's statements. */
static Datum rule_values[2];
static char rule_nulls[5] = "    ";

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
 * A source's stored share_when as the worker splices it into its
 * statements: analyzed against the table as capture analyzes it (one
 * expression over the row's columns, nothing forbidden), then deparsed,
 * so that whatever the stored text holds, the statement gets exactly one
 * canonical expression.  NULL for none.
 */
static char *
checked_share_when(Oid relid, const char *stored)
{
	Relation	rel;
	char	   *text;

	if (stored == NULL)
		return NULL;
	rel = relation_open(relid, AccessShareLock);
	text = rule_expr_deparse(rel, rule_expr_analyze_stored(rel, stored, "share_when"));
	relation_close(rel, AccessShareLock);
	return text;
}

/*
 * The SQL that turns row "t" into a JSON object, given the names of the
 * columns sent in data: all of them, or the source's columns list
 * ("listed").  Naming the columns (json_build_object) rather than the
 * whole row (to_json(t)) keeps the executor from copying the whole
 * detoasted row: with a C-CDA document of megabytes that copy is the size
 * of the document.  The result stays of type json: a cast to text is an
 * I/O conversion, two more copies of the document while the row is read.
 * A function takes at most 100 arguments, so wide tables use to_json(t),
 * and a list too long for json_build_object the to_json of a row of the
 * listed columns alone.  Data must never hold a column the list leaves
 * out, whatever the path.
 */
static char *
row_json_sql(Datum column_names, bool listed)
{
	Datum	   *names;
	int			count;
	StringInfoData sql;

	deconstruct_array(DatumGetArrayTypeP(column_names), TEXTOID, -1, false,
					  TYPALIGN_INT, &names, NULL, &count);
	if (listed && count * 2 > FUNC_MAX_ARGS)
	{
		initStringInfo(&sql);
		appendStringInfoString(&sql, "pg_catalog.to_json((SELECT r FROM (SELECT ");
		for (int i = 0; i < count; i++)
			appendStringInfo(&sql, "%st.%s", i > 0 ? ", " : "",
							 quote_identifier(TextDatumGetCString(names[i])));
		appendStringInfoString(&sql, ") r))");
		return sql.data;
	}
	if (!listed && (count == 0 || count * 2 > FUNC_MAX_ARGS))
		return "pg_catalog.to_json(t)";

	initStringInfo(&sql);
	appendStringInfoString(&sql, "pg_catalog.json_build_object(");
	for (int i = 0; i < count; i++)
	{
		char	   *name = TextDatumGetCString(names[i]);

		if (i > 0)
			appendStringInfoString(&sql, ", ");
		appendStringInfo(&sql, "%s, t.%s", quote_literal_cstr(name), quote_identifier(name));
	}
	appendStringInfoChar(&sql, ')');
	return sql.data;
}

/*
 * The SQL that estimates the bytes of row "t"'s data: the text of each
 * column sent, plus its name and punctuation.  It never builds the JSON:
 * octet_length of a text column reads the size from its TOAST header, so
 * a document of megabytes is not even detoasted to be measured (the other
 * types are written as text one column at a time).  Escaping is left out,
 * as limiting a unit to about max_batch_bytes allows.
 */
static char *
row_size_sql(Datum column_names)
{
	Datum	   *names;
	int			count;
	int			overhead = 2;
	StringInfoData sql;

	deconstruct_array(DatumGetArrayTypeP(column_names), TEXTOID, -1, false,
					  TYPALIGN_INT, &names, NULL, &count);
	if (count == 0)
		return "pg_catalog.octet_length(t::pg_catalog.text)::pg_catalog.int8";
	initStringInfo(&sql);
	appendStringInfoString(&sql, "(0::pg_catalog.int8");
	for (int i = 0; i < count; i++)
	{
		char	   *name = TextDatumGetCString(names[i]);

		/* "name":value, */
		overhead += strlen(name) + 4;
		appendStringInfo(&sql, " + COALESCE(pg_catalog.octet_length(t.%s::pg_catalog.text), 4)",
						 quote_identifier(name));
	}
	appendStringInfo(&sql, " + %d)", overhead);
	return sql.data;
}

/*
 * The SQL that writes column "column" of row t (already quoted) as capture
 * wrote it into the outbox: through portal_sync.value_text() where the
 * type's plain text is not the same in every session.
 */
static char *
value_text_sql(const char *column, Oid type)
{
	if (type_needs_value_text(getBaseType(type)))
		return psprintf("portal_sync.value_text(t.%s)", column);
	return psprintf("t.%s::pg_catalog.text", column);
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
					  " da.attname, va.attname, s.share_when,"
					  " ARRAY(SELECT a.attname FROM pg_catalog.pg_attribute a"
					  "       WHERE a.attrelid = s.relid AND a.attnum > 0 AND NOT a.attisdropped"
					  "         AND (s.columns IS NULL OR a.attname = ANY (s.columns))"
					  "       ORDER BY COALESCE(pg_catalog.array_position(s.columns, a.attname),"
					  "                         a.attnum))::pg_catalog.text[],"
					  " pa.atttypid, ka.atttypid,"
					  " (SELECT pg_catalog.format_type(ca.atttypid, NULL) FROM portal_sync.source cs"
					  "  JOIN pg_catalog.pg_attribute ca ON ca.attrelid = cs.relid AND ca.attname = cs.patient_col"
					  "  WHERE cs.kind = 'patient'), s.relid, s.columns IS NOT NULL"
					  " FROM portal_sync.source s"
					  " JOIN pg_catalog.pg_class c ON c.oid = s.relid"
					  " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
					  " JOIN pg_catalog.pg_attribute pa ON pa.attrelid = s.relid AND pa.attname = s.patient_col"
					  " JOIN pg_catalog.pg_attribute ka ON ka.attrelid = s.relid AND ka.attname = s.key_col"
					  " LEFT JOIN pg_catalog.pg_attribute da ON da.attrelid = s.relid AND da.attname = s.date_col"
					  " LEFT JOIN pg_catalog.pg_attribute va ON va.attrelid = s.relid AND va.attname = s.privacy_col"
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
		char	   *chart_patient_type = SPI_getvalue(tuple, desc, 16);
		const char *key_col = quote_identifier(SPI_getvalue(tuple, desc, 8));
		char	   *key_type = SPI_getvalue(tuple, desc, 9);
		char	   *date_col = SPI_getvalue(tuple, desc, 10);
		char	   *privacy_col = SPI_getvalue(tuple, desc, 11);
		Oid			relid = DatumGetObjectId(SPI_getbinval(tuple, desc, 17, &isnull));
		char	   *shareable = shareable_sql(date_col, privacy_col,
											  checked_share_when(relid, SPI_getvalue(tuple, desc, 12)));
		char	   *row_json = row_json_sql(SPI_getbinval(tuple, desc, 13, &isnull),
											DatumGetBool(SPI_getbinval(tuple, desc, 18, &isnull)));
		char	   *row_size = row_size_sql(SPI_getbinval(tuple, desc, 13, &isnull));

		/* a patient id is a value of the chart's type (attach checks it) */
		char	   *id_type = chart_patient_type ? chart_patient_type : patient_type;
		char	   *patient_text = value_text_sql(patient_col,
												  DatumGetObjectId(SPI_getbinval(tuple, desc, 14, &isnull)));
		char	   *key_text = value_text_sql(key_col,
											  DatumGetObjectId(SPI_getbinval(tuple, desc, 15, &isnull)));

		source->source_id = pg_strtoint32(SPI_getvalue(tuple, desc, 1));
		source->kind_name = kind;
		if (!source_kind_from_name(kind, &source->kind))
			elog(ERROR, "portal_sync.source holds an unknown kind");
		source->name = SPI_getvalue(tuple, desc, 3);

		source->relid = DatumGetObjectId(SPI_getbinval(tuple, desc, 17, &isnull));
		source->rows_by_key.sql =
			psprintf("SELECT %s, %s, %s,"
					 " CASE WHEN %s THEN %s END"
					 " FROM %s t WHERE t.%s = ANY ($3::pg_catalog.text[]::%s[])",
					 key_text, patient_text, shareable, shareable, row_json,
					 rel, key_col, key_type);
		source->rows_by_key.third_type = TEXTARRAYOID;
		source->snapshot.sql =
			psprintf("SELECT %s, %s"
					 " FROM %s t WHERE t.%s = $3::pg_catalog.text::%s AND %s ORDER BY t.%s",
					 key_text, row_json, rel, patient_col, id_type, shareable, key_col);
		source->snapshot.third_type = TEXTOID;

		/*
		 * The patient as it was asked for (p.id), not as the row spells
		 * it: the caller finds each patient's rows under the id it gave.
		 */
		source->snapshots.sql =
			psprintf("SELECT p.id, %s, %s"
					 " FROM pg_catalog.unnest($3::pg_catalog.text[]) WITH ORDINALITY AS p(id, n)"
					 " JOIN %s t ON t.%s = p.id::%s"
					 " WHERE %s ORDER BY p.n, t.%s",
					 key_text, row_json, rel, patient_col, id_type, shareable, key_col);
		source->snapshots.third_type = TEXTARRAYOID;
		source->row_sizes.sql =
			psprintf("SELECT %s, %s"
					 " FROM %s t WHERE t.%s = ANY ($3::pg_catalog.text[]::%s[])",
					 key_text, row_size, rel, key_col, key_type);
		source->row_sizes.third_type = TEXTARRAYOID;
		source->rows_with_sizes.sql =
			psprintf("SELECT %s, %s, %s, %s,"
					 " CASE WHEN (%s) AND (%s) <= $4 THEN %s END"
					 " FROM %s t WHERE t.%s = ANY ($3::pg_catalog.text[]::%s[])",
					 key_text, patient_text, shareable, row_size, shareable, row_size,
					 row_json, rel, key_col, key_type);
		source->rows_with_sizes.third_type = TEXTARRAYOID;
		source->rows_with_sizes.fourth_type = INT8OID;
		source->row_owner.sql =
			psprintf("SELECT %s FROM %s t"
					 " WHERE t.%s = $3::pg_catalog.text::%s",
					 patient_text, rel, key_col, key_type);
		source->row_owner.third_type = TEXTOID;
		source->all_keys.sql =
			psprintf("SELECT %s FROM %s t"
					 " WHERE t.%s = $3::pg_catalog.text::%s ORDER BY t.%s",
					 key_text, rel, patient_col, id_type, key_col);
		source->all_keys.third_type = TEXTOID;
		if (source->kind == SOURCE_CCDA)
		{
			/*
			 * One outbox entry per patient that has documents, with all
			 * their keys; the patient as it was asked for (p.id).
			 */
			source->requeue_documents.sql =
				psprintf("INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
						 " SELECT pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
						 " p.id, %d, 'u', pg_catalog.array_agg(%s ORDER BY t.%s), pg_catalog.now()"
						 " FROM pg_catalog.unnest($3::pg_catalog.text[]) WITH ORDINALITY AS p(id, n)"
						 " JOIN %s t ON t.%s = p.id::%s"
						 " GROUP BY p.n, p.id ORDER BY p.n",
						 source->source_id, key_text, key_col, rel, patient_col, id_type);
			source->requeue_documents.third_type = TEXTARRAYOID;
		}
		if (source->kind == SOURCE_PATIENT)
		{
			source->chart.sql =
				psprintf("SELECT %s, %s FROM %s t"
						 " WHERE t.%s = ANY ($3::pg_catalog.text[]::%s[])",
						 patient_text,
						 privacy_col ? psprintf("COALESCE(t.%s, 0) <= $2", quote_identifier(privacy_col)) : "true",
						 rel, patient_col, patient_type);
			source->chart.third_type = TEXTARRAYOID;
		}
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
 * Run one of a source's statements with the rule parameters, $3 and, if
 * the statement has one, $4.  It is parsed and analyzed once, the first
 * time, and kept: the worker runs the same statements for every unit.  It
 * is planned at each run (a custom plan, for the parameters and the
 * table's size now; see spi_query).
 */
static void
execute_source_statement(SourceStatement *statement, Datum third, Datum fourth,
						 bool read_only, int expected)
{
	MemoryContext caller = CurrentMemoryContext;
	Datum		values[4] = {rule_values[0], rule_values[1], third, fourth};
	int			ret;

	if (statement->plan == NULL)
	{
		Oid			types[4] = {DATEOID, INT4OID, statement->third_type, statement->fourth_type};
		int			nargs = OidIsValid(statement->fourth_type) ? 4 : 3;
		SPIPlanPtr	plan = SPI_prepare_cursor(statement->sql, nargs, types, CURSOR_OPT_CUSTOM_PLAN);

		if (plan == NULL)
			elog(ERROR, "preparing a statement on an attached table failed: %s",
				 SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "keeping a plan failed");
		statement->plan = plan;
	}
	ret = SPI_execute_plan(statement->plan, values, rule_nulls, read_only, 0);
	MemoryContextSwitchTo(caller);
	if (ret != expected)
		elog(ERROR, "a statement on an attached table failed: %s", SPI_result_code_string(ret));
}

/*
 * Run one of a source's reading statements.
 */
static void
run_source_statement(SourceStatement *statement, Datum third, Datum fourth)
{
	execute_source_statement(statement, third, fourth, true, SPI_OK_SELECT);
}

/*
 * Free the kept plans of a source list (before it is loaded again).
 */
void
free_worker_source_plans(List *sources)
{
	ListCell   *lc;

	foreach(lc, sources)
	{
		WorkerSource *source = lfirst(lc);
		SourceStatement *statements[] = {&source->rows_by_key, &source->snapshot,
			&source->snapshots, &source->all_keys,
			&source->row_owner, &source->row_sizes, &source->rows_with_sizes, &source->chart,
		&source->requeue_documents};

		for (int i = 0; i < lengthof(statements); i++)
		{
			if (statements[i]->plan != NULL)
				SPI_freeplan(statements[i]->plan);
			statements[i]->plan = NULL;
		}
	}
}

/* Rule errors of the unit being built, per source and SQLSTATE. */
typedef struct RuleErrorCount
{
	int32		source_id;
	int			sqlerrcode;
	int64		rows;
} RuleErrorCount;

static List *rule_error_counts = NIL;

/*
 * Can an error of a statement reading rows be the rules' fault on one row
 * (a bad cast of a free-text column in share_when, a division by zero, a
 * check of a domain, a function that raises)?  Only data exceptions and
 * the errors a routine raises are: anything else (a function or column
 * that went away, resources, concurrency, cancellation) would fail on
 * every row alike, and is raised on, so that delivery backs off instead of
 * withholding everything.
 */
static bool
is_rule_error(int sqlerrcode)
{
	const char *state = unpack_sql_state(sqlerrcode);

	return strncmp(state, "22", 2) == 0 ||	/* data exception */
		strncmp(state, "23", 2) == 0 ||	/* integrity constraint (domains) */
		strncmp(state, "P0", 2) == 0 ||	/* raised by PL/pgSQL */
		strncmp(state, "2F", 2) == 0 ||	/* SQL routine exception */
		strncmp(state, "38", 2) == 0 ||	/* external routine exception */
		strncmp(state, "39", 2) == 0;	/* external routine invocation */
}

/*
 * Run a source's statement in a subtransaction.  Returns 0 if it ran (its
 * rows in SPI_tuptable), or the SQLSTATE of a rule error, which is rolled
 * back; any other error is raised on.
 */
static int
try_source_statement(SourceStatement *statement, Datum third, Datum fourth)
{
	MemoryContext caller = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile int sqlerrcode = 0;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(caller);
	PG_TRY();
	{
		run_source_statement(statement, third, fourth);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(caller);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *error;

		MemoryContextSwitchTo(caller);
		error = CopyErrorData();
		if (!is_rule_error(error->sqlerrcode))
			PG_RE_THROW();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(caller);
		CurrentResourceOwner = owner;
		sqlerrcode = error->sqlerrcode;
		FreeErrorData(error);
	}
	PG_END_TRY();
	return sqlerrcode;
}

/*
 * Count a row withheld because the rules failed on it.
 */
static void
count_rule_error(WorkerSource *source, int sqlerrcode)
{
	ListCell   *lc;
	RuleErrorCount *count;

	foreach(lc, rule_error_counts)
	{
		count = lfirst(lc);
		if (count->source_id == source->source_id && count->sqlerrcode == sqlerrcode)
		{
			count->rows++;
			return;
		}
	}
	count = palloc0(sizeof(RuleErrorCount));
	count->source_id = source->source_id;
	count->sqlerrcode = sqlerrcode;
	count->rows = 1;
	rule_error_counts = lappend(rule_error_counts, count);
}

/*
 * A new unit: no rule errors counted yet (the last unit's list went with
 * its memory).
 */
void
rule_errors_reset(void)
{
	rule_error_counts = NIL;
}

/*
 * Add the unit's rule errors to portal_sync.rule_error, in the unit's
 * transaction (the worker is the table's only writer).
 */
void
rule_errors_record(void)
{
	ListCell   *lc;

	foreach(lc, rule_error_counts)
	{
		RuleErrorCount *count = lfirst(lc);
		Oid			types[3] = {INT4OID, TEXTOID, INT8OID};
		Datum		values[3] = {Int32GetDatum(count->source_id),
			CStringGetTextDatum(unpack_sql_state(count->sqlerrcode)),
		Int64GetDatum(count->rows)};

		if (spi_query("INSERT INTO portal_sync.rule_error AS r (source_id, sqlstate, errors, last_error_at)"
					  " VALUES ($1, $2, $3, pg_catalog.now())"
					  " ON CONFLICT (source_id, sqlstate) DO UPDATE"
					  " SET errors = r.errors + EXCLUDED.errors, last_error_at = EXCLUDED.last_error_at",
					  3, types, values, NULL, false) != SPI_OK_INSERT)
			elog(ERROR, "recording rule errors failed");
	}
	rule_error_counts = NIL;
}

/*
 * Fill the map from the rows of a rows_by_key statement in SPI_tuptable.
 */
static void
collect_rows_by_key(HTAB *rows)
{
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
		row->data_unread = false;
		/* a row of megabytes is not kept twice until the last one is read */
		heap_freetuple(tuple);
		SPI_tuptable->vals[i] = NULL;
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Read the rows with these keys of a source: fills the map (entries are
 * SourceRow, keyed by key) in the current memory context.  If the rules
 * fail on some row, the rows are read again one by one: a row they fail
 * on is withheld (not shareable: a delete if the portal may hold it), and
 * counted; the others go as usual.
 */
void
read_rows_by_key(WorkerSource *source, char **keys, int nkeys, HTAB *rows)
{
	int			sqlerrcode = try_source_statement(&source->rows_by_key, text_array(keys, nkeys),
												  (Datum) 0);

	if (sqlerrcode == 0)
	{
		collect_rows_by_key(rows);
		return;
	}

	for (int k = 0; k < nkeys; k++)
	{
		sqlerrcode = try_source_statement(&source->rows_by_key, text_array(&keys[k], 1), (Datum) 0);
		if (sqlerrcode == 0)
			collect_rows_by_key(rows);
		else
		{
			/* the row as the rules cannot see it: its key and patient */
			run_source_statement(&source->row_owner, CStringGetTextDatum(keys[k]), (Datum) 0);
			if (SPI_processed > 0)
			{
				bool		found;
				SourceRow  *row = string_map_enter(rows, pstrdup(keys[k]), &found);

				row->patient_id = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
				row->shareable = false;
				row->data_json = NULL;
				row->data_unread = false;
				count_rule_error(source, sqlerrcode);
			}
			SPI_freetuptable(SPI_tuptable);
		}
	}
}

/*
 * The sizes of the data of the rows with these keys of a source (as
 * sent, before escaping), into the map under "source_id|key".  The rules
 * are not applied: a withheld row counts as if it were sent.
 */
void
read_row_sizes(WorkerSource *source, char **keys, int nkeys, HTAB *sizes)
{
	run_source_statement(&source->row_sizes, text_array(keys, nkeys), (Datum) 0);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		found;
		bool		isnull;
		char	   *id = psprintf("%d|%s", source->source_id,
								  SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1));
		RowSize    *size = string_map_enter(sizes, id, &found);
		Datum		bytes = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull);

		size->bytes = isnull ? 0 : (size_t) DatumGetInt64(bytes);
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * The rows with these keys of a source and the sizes of their data, in
 * one statement: sizes into the map under "source_id|key" (as
 * read_row_sizes), rows into the other map (as read_rows_by_key) with
 * their data if it is at most max_row_bytes; a shareable row larger than
 * that is entered with data_unread, to be read by key once the unit knows
 * it keeps it.  The data read is so at most nkeys x max_row_bytes,
 * whatever the rows' sizes, and the common unit of small rows reads each
 * row once instead of twice.  Returns false, having read nothing, if the
 * rules fail on some row: then the caller asks the sizes alone and reads
 * the rows by key, one by one where they fail (read_rows_by_key).
 */
bool
read_rows_with_sizes(WorkerSource *source, char **keys, int nkeys, size_t max_row_bytes,
					 HTAB *rows, HTAB *sizes)
{
	if (try_source_statement(&source->rows_with_sizes, text_array(keys, nkeys),
							 Int64GetDatum((int64) Min(max_row_bytes, (size_t) PG_INT64_MAX))) != 0)
		return false;

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *key = SPI_getvalue(tuple, desc, 1);
		char	   *shareable = SPI_getvalue(tuple, desc, 3);
		bool		isnull;
		Datum		bytes = SPI_getbinval(tuple, desc, 4, &isnull);
		bool		found;
		RowSize    *size = string_map_enter(sizes, psprintf("%d|%s", source->source_id, key),
											&found);
		SourceRow  *row = string_map_enter(rows, key, &found);

		size->bytes = isnull ? 0 : (size_t) DatumGetInt64(bytes);
		row->patient_id = SPI_getvalue(tuple, desc, 2);
		row->shareable = shareable != NULL && shareable[0] == 't';
		row->data_json = row->shareable ? SPI_getvalue(tuple, desc, 5) : NULL;
		row->data_unread = row->shareable && row->data_json == NULL;
		heap_freetuple(tuple);
		SPI_tuptable->vals[i] = NULL;
	}
	SPI_freetuptable(SPI_tuptable);
	return true;
}

/*
 * Is each patient's chart shareable?  Fills the map (entries are
 * ChartState, keyed by patient id) for the patients that have a chart row.
 */
void
read_charts(WorkerSource *chart_source, char **patient_ids, int count, HTAB *charts)
{
	run_source_statement(&chart_source->chart, text_array(patient_ids, count), (Datum) 0);

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
 * The shareable rows of a patient in a source, for a snapshot: a list of
 * SourceRow (key, data) in key order.  If the rules fail on some row, the
 * patient's rows are read one by one, and only the rows they fail on are
 * withheld (and counted).
 */
List *
read_snapshot_rows(WorkerSource *source, const char *patient_id)
{
	List	   *result = NIL;
	int			sqlerrcode = try_source_statement(&source->snapshot, CStringGetTextDatum(patient_id),
												  (Datum) 0);

	if (sqlerrcode == 0)
	{
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			SourceRow  *row = palloc0(sizeof(SourceRow));

			row->key = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
			row->patient_id = (char *) patient_id;
			row->shareable = true;
			row->data_json = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);
			result = lappend(result, row);
			heap_freetuple(SPI_tuptable->vals[i]);
			SPI_tuptable->vals[i] = NULL;
		}
		SPI_freetuptable(SPI_tuptable);
	}
	else
	{
		char	  **keys;
		int			nkeys;
		HTAB	   *rows = string_map_create("portal_sync snapshot rows", sizeof(SourceRow),
											 CurrentMemoryContext);

		read_all_keys(source, patient_id);
		nkeys = (int) SPI_processed;
		keys = palloc(Max(nkeys, 1) * sizeof(char *));
		for (int i = 0; i < nkeys; i++)
			keys[i] = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		SPI_freetuptable(SPI_tuptable);
		read_rows_by_key(source, keys, nkeys, rows);
		for (int i = 0; i < nkeys; i++)
		{
			SourceRow  *row = string_map_find(rows, keys[i]);

			if (row != NULL && row->shareable && strcmp(row->patient_id, patient_id) == 0)
			{
				row->key = keys[i];
				result = lappend(result, row);
			}
		}
	}
	return result;
}

/*
 * Read the keys of all rows of a patient in a source; the caller walks
 * SPI_tuptable (key) and frees it.
 */
void
read_all_keys(WorkerSource *source, const char *patient_id)
{
	run_source_statement(&source->all_keys, CStringGetTextDatum(patient_id), (Datum) 0);
}

/*
 * Queue all C-CDA documents of these patients again (one outbox entry per
 * patient that has any), in one statement: after their snapshots were
 * accepted, the documents go, each as an upsert or a delete.
 */
void
requeue_documents(WorkerSource *source, char **patient_ids, int count)
{
	execute_source_statement(&source->requeue_documents, text_array(patient_ids, count),
							 (Datum) 0, false, SPI_OK_INSERT);
}

/*
 * The shareable rows of many patients in a source, for their snapshots,
 * in one statement: into the map (entries are SnapshotRows, keyed by the
 * patient id as given) a list of SourceRow in key order for each patient
 * that has rows.  Returns false, reading nothing, if the rules fail on
 * some row: then each patient is read alone (read_snapshot_rows), which
 * withholds only the rows they fail on.
 */
bool
read_snapshots_rows(WorkerSource *source, char **patient_ids, int count, HTAB *rows_by_patient)
{
	SnapshotRows *current = NULL;

	if (try_source_statement(&source->snapshots, text_array(patient_ids, count), (Datum) 0) != 0)
		return false;

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *patient_id = SPI_getvalue(tuple, desc, 1);
		SourceRow  *row = palloc0(sizeof(SourceRow));

		if (current == NULL || strcmp(current->patient_id, patient_id) != 0)
		{
			bool		found;

			current = string_map_enter(rows_by_patient, patient_id, &found);
			if (!found)
				current->rows = NIL;
		}
		row->key = SPI_getvalue(tuple, desc, 2);
		row->patient_id = current->patient_id;
		row->shareable = true;
		row->data_json = SPI_getvalue(tuple, desc, 3);
		current->rows = lappend(current->rows, row);
		/* rows of megabytes are not kept twice */
		heap_freetuple(tuple);
		SPI_tuptable->vals[i] = NULL;
	}
	SPI_freetuptable(SPI_tuptable);
	return true;
}
