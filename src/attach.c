/*-------------------------------------------------------------------------
 *
 * attach.c
 *		portal_sync.attach() and portal_sync.detach().
 *
 * attach() checks everything about a table before it changes anything,
 * then, in the caller's transaction, records the settings in
 * portal_sync.source and creates the capture triggers.  The triggers
 * depend on the columns that portal_sync reads, so those columns cannot be
 * dropped or retyped under it.  The settings name the columns and keep the
 * rules as SQL text, so that pg_dump / pg_restore carry them; renaming a
 * column rewrites them (attachment_ddl.c), and a restore's CREATE TRIGGER
 * records the dependencies again.  The columns sent in data (the columns
 * argument, the minimum-necessary list) are kept and protected the same
 * way.
 *
 * A partitioned table is attached as one source: its partitions, at every
 * level, get the capture triggers too (statement triggers fire only on the
 * table a statement names), and partitions.c gives them to partitions
 * created or attached later.  A partition itself cannot be attached.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/catalog.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_index.h"
#include "catalog/pg_trigger.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/nodeFuncs.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/partcache.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "portal_sync.h"

PG_FUNCTION_INFO_V1(portal_sync_attach);
PG_FUNCTION_INFO_V1(portal_sync_detach);

/* The capture triggers, one per event: transition tables allow no more. */
typedef struct CaptureTrigger
{
	const char *name;
	const char *definition;		/* after "CREATE TRIGGER name AFTER " */
} CaptureTrigger;

static const CaptureTrigger capture_triggers[] = {
	{"portal_sync_capture_insert",
	"INSERT ON %s REFERENCING NEW TABLE AS portal_sync_new"},
	{"portal_sync_capture_update",
	"UPDATE ON %s REFERENCING OLD TABLE AS portal_sync_old NEW TABLE AS portal_sync_new"},
	{"portal_sync_capture_delete",
	"DELETE ON %s REFERENCING OLD TABLE AS portal_sync_old"},
	{"portal_sync_capture_truncate",
	"TRUNCATE ON %s"},			/* BEFORE: the rows are still there */
};

/* attach() is creating capture triggers (it records their dependencies) */
static bool creating_triggers = false;

/* What attach() was asked, checked. */
typedef struct AttachRequest
{
	Oid			relid;
	char	   *qualified_name;
	SourceKind	kind;
	const char *kind_name;
	char	   *name;
	AttrNumber	patient_attnum;
	AttrNumber	key_attnum;
	AttrNumber	date_attnum;
	AttrNumber	privacy_attnum;
	char	   *share_when_text;
	Node	   *share_when;
	char	   *enroll_when_text;
	Node	   *enroll_when;
	bool		has_columns_arg;	/* false: called through 1.0's signature */
	int			ncolumns;		/* -1: all columns (columns is NULL) */
	AttrNumber *columns;
} AttachRequest;

/*
 * Attribute number of a named column of the table, which must exist.
 */
static AttrNumber
required_column(Relation rel, const char *column, const char *argname)
{
	AttrNumber	attnum = get_attnum(RelationGetRelid(rel), column);

	if (attnum == InvalidAttrNumber || attnum < 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of relation \"%s\" does not exist",
						column, RelationGetRelationName(rel)),
				 errdetail("It was given as %s.", argname)));
	return attnum;
}

/*
 * The base type of a column, looking through domains.
 */
static Oid
column_base_type(Relation rel, AttrNumber attnum)
{
	return getBaseType(TupleDescAttr(RelationGetDescr(rel), attnum - 1)->atttypid);
}

/*
 * Is this column one of the partition key's columns of a partitioned
 * table?  (A unique index of a partitioned table must hold them all.)
 */
static bool
is_partition_key_column(Relation rel, AttrNumber attnum)
{
	PartitionKey key;

	if (rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
		return false;
	key = RelationGetPartitionKey(rel);
	for (int i = 0; i < key->partnatts; i++)
	{
		if (key->partattrs[i] == attnum)
			return true;
	}
	return false;
}

/*
 * The column a unique index makes identify one row, or InvalidAttrNumber:
 * the index's only column, or, on a partitioned table, its only column
 * outside the partition key (*with_partition_key is then set).  PostgreSQL
 * lets a unique index of a partitioned table hold the partition key only,
 * so (id, taken_on) is what a date-partitioned table can have; id alone is
 * unique only if its values never repeat across partitions, which the
 * caller says.
 */
static AttrNumber
index_key_column(Relation rel, Form_pg_index index, bool *with_partition_key)
{
	AttrNumber	column = InvalidAttrNumber;

	*with_partition_key = false;
	if (index->indnkeyatts == 1)
		return index->indkey.values[0];
	for (int i = 0; i < index->indnkeyatts; i++)
	{
		AttrNumber	attnum = index->indkey.values[i];

		if (attnum == 0)
			return InvalidAttrNumber;	/* an expression */
		if (is_partition_key_column(rel, attnum))
			continue;
		if (column != InvalidAttrNumber)
			return InvalidAttrNumber;	/* two columns of its own */
		column = attnum;
	}
	*with_partition_key = column != InvalidAttrNumber;
	return column;
}

/*
 * Is there a valid, immediate, non-partial unique index that makes this
 * column identify one row (see index_key_column)?  Delivery finds a row
 * again by its key, so it must name one row.  An index on the column
 * alone is preferred; *with_partition_key says that only one with the
 * partition key exists.
 */
static bool
column_has_unique_index(Relation rel, AttrNumber attnum, bool *with_partition_key)
{
	List	   *indexes = RelationGetIndexList(rel);
	ListCell   *lc;
	bool		alone = false;
	bool		with_key = false;

	foreach(lc, indexes)
	{
		HeapTuple	tuple = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(lfirst_oid(lc)));
		Form_pg_index index;
		bool		this_with_key;

		if (!HeapTupleIsValid(tuple))
			continue;
		index = (Form_pg_index) GETSTRUCT(tuple);
		if (index->indisunique && index->indisvalid && index->indimmediate &&
			heap_attisnull(tuple, Anum_pg_index_indpred, NULL) &&
			index_key_column(rel, index, &this_with_key) == attnum)
		{
			if (this_with_key)
				with_key = true;
			else
				alone = true;
		}
		ReleaseSysCache(tuple);
	}
	list_free(indexes);
	*with_partition_key = with_key && !alone;
	return alone || with_key;
}

/*
 * Say that a partitioned table's key is unique only with the partition
 * key: attach accepts it, and the DBA must keep it unique across
 * partitions (one sequence for the whole table).
 */
static void
notice_key_with_partition_key(Relation rel, AttrNumber attnum)
{
	ereport(NOTICE,
			(errmsg("key_col \"%s\" of partitioned table \"%s\" is unique only together with the partition key",
					get_attname(RelationGetRelid(rel), attnum, false),
					RelationGetRelationName(rel)),
			 errdetail("The portal knows a row by its key alone: its values must never repeat across partitions."),
			 errhint("Give the key its values from one sequence for the whole table (DEFAULT nextval(...)).")));
}

/*
 * Is there an index whose first column is this one?  Delivery looks up a
 * patient's rows by it when it builds a snapshot.
 */
static bool
column_leads_an_index(Relation rel, AttrNumber attnum)
{
	List	   *indexes = RelationGetIndexList(rel);
	ListCell   *lc;
	bool		found = false;

	foreach(lc, indexes)
	{
		HeapTuple	tuple = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(lfirst_oid(lc)));

		if (!HeapTupleIsValid(tuple))
			continue;
		found = ((Form_pg_index) GETSTRUCT(tuple))->indkey.values[0] == attnum;
		ReleaseSysCache(tuple);
		if (found)
			break;
	}
	list_free(indexes);
	return found;
}

/*
 * The single column of the table's primary key, the default key_col; on
 * a partitioned table, the primary key's only column outside the
 * partition key.
 */
static AttrNumber
primary_key_column(Relation rel)
{
	Oid			pk = RelationGetPrimaryKeyIndex(rel);
	HeapTuple	tuple;
	AttrNumber	attnum = InvalidAttrNumber;
	bool		with_partition_key = false;

	if (OidIsValid(pk))
	{
		tuple = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(pk));
		if (HeapTupleIsValid(tuple))
		{
			attnum = index_key_column(rel, (Form_pg_index) GETSTRUCT(tuple),
									  &with_partition_key);
			ReleaseSysCache(tuple);
		}
	}
	if (attnum == InvalidAttrNumber)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TABLE_DEFINITION),
				 errmsg("relation \"%s\" has no single-column primary key",
						RelationGetRelationName(rel)),
				 errhint("Give key_col, a column with a unique index.")));
	if (with_partition_key)
		notice_key_with_partition_key(rel, attnum);
	return attnum;
}

/*
 * Check that the relation can be attached by the current user.
 */
static void
check_relation(Relation rel)
{
	Form_pg_class form = RelationGetForm(rel);

	if (form->relispartition)
	{
		Oid			root = llast_oid(get_partition_ancestors(RelationGetRelid(rel)));

		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is a partition of \"%s\"", RelationGetRelationName(rel),
						get_rel_name(root)),
				 errdetail("A partitioned table is attached as a whole."),
				 errhint("Attach the partitioned table %s: every partition, present or created later, is captured with it.",
						 quote_qualified_identifier(get_namespace_name(get_rel_namespace(root)),
													get_rel_name(root)))));
	}
	if (form->relkind != RELKIND_RELATION && form->relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is not a table", RelationGetRelationName(rel)),
				 errdetail("Only ordinary and partitioned tables can be attached.")));
	if (form->relpersistence == RELPERSISTENCE_TEMP)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is a temporary table", RelationGetRelationName(rel)),
				 errdetail("The delivery worker cannot read another session's temporary tables.")));
	if (IsCatalogRelation(rel) ||
		strcmp(get_namespace_name(RelationGetNamespace(rel)), PORTAL_SYNC_SCHEMA) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" cannot be attached", RelationGetRelationName(rel)),
				 errdetail("System catalogs and portal_sync's own tables cannot be attached.")));
	if (!pg_class_ownercheck(RelationGetRelid(rel), GetUserId()))
		aclcheck_error(ACLCHECK_NOT_OWNER, get_relkind_objtype(form->relkind),
					   RelationGetRelationName(rel));
}

/*
 * Check the columns argument, the minimum-necessary list of the columns
 * sent in data, into attribute numbers in the order given.  Every entry
 * must be an ordinary column of the table, named once; an empty list
 * would send rows without content and is refused (NULL means all).
 */
static void
check_columns(Relation rel, ArrayType *array, AttachRequest *req)
{
	Datum	   *names;
	bool	   *nulls;
	int			count;

	if (ARR_NDIM(array) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("columns must be a one-dimensional array")));
	deconstruct_array(array, NAMEOID, NAMEDATALEN, false, TYPALIGN_CHAR,
					  &names, &nulls, &count);
	if (count == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("columns must name at least one column"),
				 errhint("Give NULL (the default) to send every column.")));

	req->ncolumns = count;
	req->columns = palloc(count * sizeof(AttrNumber));
	for (int i = 0; i < count; i++)
	{
		const char *column;
		AttrNumber	attnum;

		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("columns must not contain NULL")));
		column = NameStr(*DatumGetName(names[i]));
		attnum = get_attnum(RelationGetRelid(rel), column);
		if (attnum == InvalidAttrNumber)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" of relation \"%s\" does not exist",
							column, RelationGetRelationName(rel)),
					 errdetail("It was given in columns.")));
		if (attnum < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_COLUMN_REFERENCE),
					 errmsg("\"%s\" is a system column", column),
					 errdetail("columns lists columns of the table's rows.")));
		for (int j = 0; j < i; j++)
		{
			if (req->columns[j] == attnum)
				ereport(ERROR,
						(errcode(ERRCODE_DUPLICATE_COLUMN),
						 errmsg("column \"%s\" is given twice in columns", column)));
		}
		req->columns[i] = attnum;
	}
}

/*
 * Check every argument of attach(), filling the request.  Nothing is
 * changed yet.
 */
static void
check_attach_request(Relation rel, FunctionCallInfo fcinfo, AttachRequest *req)
{
	Oid			type;

	check_relation(rel);
	req->relid = RelationGetRelid(rel);
	req->qualified_name =
		quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
								   RelationGetRelationName(rel));

	if (PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("kind and patient_col must be given")));

	req->kind_name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (!source_kind_from_name(req->kind_name, &req->kind))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown kind \"%s\"", req->kind_name),
				 errhint("The kinds are appointment, ccda, note, pin, insurance, clinical and patient.")));

	req->patient_attnum = required_column(rel, NameStr(*PG_GETARG_NAME(2)), "patient_col");

	if (PG_ARGISNULL(3))
		req->key_attnum = primary_key_column(rel);
	else
	{
		bool		with_partition_key;

		req->key_attnum = required_column(rel, NameStr(*PG_GETARG_NAME(3)), "key_col");
		if (!column_has_unique_index(rel, req->key_attnum, &with_partition_key))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TABLE_DEFINITION),
					 errmsg("key_col \"%s\" has no unique index of its own",
							NameStr(*PG_GETARG_NAME(3))),
					 rel->rd_rel->relkind == RELKIND_PARTITIONED_TABLE ?
					 errhint("A key column must identify one row: create a unique index on it and the partition key's columns.") :
					 errhint("A key column must identify one row: create a unique index on it alone.")));
		if (with_partition_key)
			notice_key_with_partition_key(rel, req->key_attnum);
	}

	req->date_attnum = InvalidAttrNumber;
	if (!PG_ARGISNULL(4))
	{
		req->date_attnum = required_column(rel, NameStr(*PG_GETARG_NAME(4)), "date_col");
		type = column_base_type(rel, req->date_attnum);
		if (type != DATEOID && type != TIMESTAMPOID && type != TIMESTAMPTZOID)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("date_col \"%s\" must be of type date or timestamp, not %s",
							NameStr(*PG_GETARG_NAME(4)), format_type_be(type))));
	}

	req->privacy_attnum = InvalidAttrNumber;
	if (!PG_ARGISNULL(5))
	{
		req->privacy_attnum = required_column(rel, NameStr(*PG_GETARG_NAME(5)), "privacy_col");
		type = column_base_type(rel, req->privacy_attnum);
		if (type != INT2OID && type != INT4OID && type != INT8OID)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("privacy_col \"%s\" must be an integer column, not %s",
							NameStr(*PG_GETARG_NAME(5)), format_type_be(type))));
	}

	req->share_when_text = PG_ARGISNULL(6) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(6));
	if (req->share_when_text != NULL)
		req->share_when = rule_expr_compile(rel, req->share_when_text, "share_when");

	req->enroll_when_text = PG_ARGISNULL(7) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(7));
	if (req->enroll_when_text != NULL)
	{
		if (!source_kind_enrolls(req->kind))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("enroll_when does not apply to kind \"%s\"", req->kind_name),
					 errhint("Only appointment, ccda, note and pin rows are initiating events.")));
		req->enroll_when = rule_expr_compile(rel, req->enroll_when_text, "enroll_when");
	}

	req->name = PG_ARGISNULL(8) ? pstrdup(RelationGetRelationName(rel))
		: text_to_cstring(PG_GETARG_TEXT_PP(8));
	if (req->name[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("name must not be empty")));

	/* 1.0's attach() has no columns argument (nor a column to store it) */
	req->has_columns_arg = PG_NARGS() > 9;
	req->ncolumns = -1;
	if (req->has_columns_arg && !PG_ARGISNULL(9))
		check_columns(rel, PG_GETARG_ARRAYTYPE_P(9), req);

	if (!column_leads_an_index(rel, req->patient_attnum))
		ereport(WARNING,
				(errmsg("patient_col \"%s\" of \"%s\" has no index",
						get_attname(req->relid, req->patient_attnum, false),
						RelationGetRelationName(rel)),
				 errhint("Snapshots read a patient's rows by it: CREATE INDEX ON %s (%s).",
						 req->qualified_name,
						 quote_identifier(get_attname(req->relid, req->patient_attnum, false)))));
}

/*
 * Run one statement through SPI with parameters; the caller is connected.
 */
static void
execute_with_args(const char *sql, int nargs, Oid *types, Datum *values,
				  const char *nulls, int expected)
{
	int			ret = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);

	if (ret != expected)
		elog(ERROR, "SPI_execute_with_args failed: %s", SPI_result_code_string(ret));
}

/*
 * Refuse a second chart: there is one patient source, whose privacy
 * column is the chart-level privacy.
 */
static void
check_single_chart(AttachRequest *req)
{
	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(req->relid)};

	if (req->kind != SOURCE_PATIENT)
		return;
	execute_with_args("SELECT relid::pg_catalog.regclass::pg_catalog.text"
					  " FROM portal_sync.source WHERE kind = 'patient' AND relid <> $1",
					  1, types, values, NULL, SPI_OK_SELECT);
	if (SPI_processed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("a patient source is already attached: %s",
						SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1)),
				 errhint("Detach it first; the chart is one table.")));
}

/*
 * How a patient id type compares with others: ids of all sources are
 * compared as values of the chart's type, so each source's ids must be
 * values of that type too.  Integers rank by width; numeric, the text
 * types and uuid are families of their own.  0: not a type an id can be
 * compared exactly in (its text depends on settings, or it has no exact
 * equality with the chart's).
 */
static int
patient_type_rank(Oid base_type)
{
	switch (base_type)
	{
		case INT2OID:
			return 1;
		case INT4OID:
			return 2;
		case INT8OID:
			return 3;
		case NUMERICOID:
			return 10;
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
			return 20;
		case UUIDOID:
			return 30;
		default:
			return 0;
	}
}

/*
 * Whether every patient id of a source of type "source" is a value of the
 * chart's type "chart", with the same text.
 */
static bool
patient_types_agree(Oid source, Oid chart)
{
	int			source_rank = patient_type_rank(source);
	int			chart_rank = patient_type_rank(chart);

	if (source_rank <= 3 && chart_rank <= 3)
		return source_rank <= chart_rank;
	return source_rank == chart_rank;
}

/*
 * Refuse a patient column whose ids cannot be compared as values with the
 * chart's: checked against the chart when a source is attached, and
 * against every source when the chart is.
 */
static void
check_patient_type(AttachRequest *req, Relation rel)
{
	Oid			type = column_base_type(rel, req->patient_attnum);
	Oid			types[2] = {OIDOID, BOOLOID};
	Datum		values[2] = {ObjectIdGetDatum(req->relid), BoolGetDatum(req->kind == SOURCE_PATIENT)};

	if (patient_type_rank(type) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("patient_col \"%s\" is of type %s, which cannot identify a patient exactly",
						get_attname(req->relid, req->patient_attnum, false), format_type_be(type)),
				 errhint("Patient ids must be integer, numeric, text, varchar, char or uuid.")));

	execute_with_args(psprintf("SELECT s.relid::pg_catalog.regclass::pg_catalog.text, a.atttypid, s.kind = 'patient'"
							   " FROM portal_sync.source s"
							   " JOIN pg_catalog.pg_attribute a ON a.attrelid = s.relid AND %s"
							   " WHERE s.relid <> $1 AND ($2 OR s.kind = 'patient')",
							   source_settings_by_name() ? "a.attname = s.patient_col"
							   : "a.attnum = s.patient_attnum"),
					  2, types, values, NULL, SPI_OK_SELECT);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		bool		isnull;
		Oid			other = getBaseType(DatumGetObjectId(SPI_getbinval(tuple, SPI_tuptable->tupdesc, 2, &isnull)));
		bool		other_is_chart = DatumGetBool(SPI_getbinval(tuple, SPI_tuptable->tupdesc, 3, &isnull));
		Oid			source_type = other_is_chart ? type : other;
		Oid			chart_type = other_is_chart ? other : type;

		if (!patient_types_agree(source_type, chart_type))
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("patient ids of type %s%s cannot be compared exactly with the chart's patient ids of type %s%s",
							format_type_be(source_type),
							other_is_chart ? "" : psprintf(" (%s)", SPI_getvalue(tuple, SPI_tuptable->tupdesc, 1)),
							format_type_be(chart_type),
							other_is_chart ? psprintf(" (%s)", SPI_getvalue(tuple, SPI_tuptable->tupdesc, 1)) : ""),
					 errhint("Ids are compared as values of the chart's type: give every patient column that type, or a narrower integer type for an integer chart.")));
	}
}

/*
 * Refuse a key column whose text cannot be read back the same in every
 * session.
 */
static void
check_key_type(AttachRequest *req, Relation rel)
{
	Oid			type = column_base_type(rel, req->key_attnum);

	if (type == CASHOID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("key_col \"%s\" is of type money, whose text depends on lc_monetary",
						get_attname(req->relid, req->key_attnum, false))));
}

/*
 * Refuse a name that another attached table uses on the wire.
 */
static void
check_name_is_free(AttachRequest *req)
{
	Oid			types[2] = {TEXTOID, OIDOID};
	Datum		values[2] = {CStringGetTextDatum(req->name), ObjectIdGetDatum(req->relid)};

	execute_with_args("SELECT relid::pg_catalog.regclass::pg_catalog.text"
					  " FROM portal_sync.source WHERE name = $1 AND relid <> $2",
					  2, types, values, NULL, SPI_OK_SELECT);
	if (SPI_processed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("source name \"%s\" is already used by %s", req->name,
						SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1)),
				 errhint("Give another name with the name argument.")));

	/*
	 * A retraction still being delivered sends deletes under its name,
	 * which would take the new attachment's items off the portal.  (A 1.0
	 * schema has no retractions.)
	 */
	if (portal_sync_relid_if_exists("retraction") == InvalidOid)
		return;
	execute_with_args("SELECT 1 FROM portal_sync.retraction WHERE name = $1",
					  1, types, values, NULL, SPI_OK_SELECT);
	if (SPI_processed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg("source name \"%s\" is still being retracted", req->name),
				 errdetail("The deletes of a table detached with retract => true under this name are not all delivered yet."),
				 errhint("Attach it again once portal_sync.retraction no longer lists the name, or give another name with the name argument.")));
}

/*
 * A name as a datum of type name.
 */
static Datum
name_datum(const char *name)
{
	return DirectFunctionCall1(namein, CStringGetDatum(name));
}

/*
 * Insert or replace the table's row of portal_sync.source, as 1.1 keeps
 * it: the table as a regclass, columns by name, rules as SQL text.
 */
static void
store_source(AttachRequest *req, Relation rel)
{
	Oid			types[10] = {REGCLASSOID, TEXTOID, TEXTOID, NAMEOID, NAMEOID, NAMEOID,
	NAMEOID, TEXTOID, TEXTOID, NAMEARRAYOID};
	Datum		values[10];
	char		nulls[11] = "          ";

	values[0] = ObjectIdGetDatum(req->relid);
	values[1] = CStringGetTextDatum(req->kind_name);
	values[2] = CStringGetTextDatum(req->name);
	values[3] = name_datum(get_attname(req->relid, req->patient_attnum, false));
	values[4] = name_datum(get_attname(req->relid, req->key_attnum, false));
	if (req->date_attnum != InvalidAttrNumber)
		values[5] = name_datum(get_attname(req->relid, req->date_attnum, false));
	else
		nulls[5] = 'n';
	if (req->privacy_attnum != InvalidAttrNumber)
		values[6] = name_datum(get_attname(req->relid, req->privacy_attnum, false));
	else
		nulls[6] = 'n';
	if (req->share_when != NULL)
		values[7] = CStringGetTextDatum(rule_expr_deparse(rel, req->share_when));
	else
		nulls[7] = 'n';
	if (req->enroll_when != NULL)
		values[8] = CStringGetTextDatum(rule_expr_deparse(rel, req->enroll_when));
	else
		nulls[8] = 'n';
	if (req->ncolumns > 0)
	{
		Datum	   *names = palloc(req->ncolumns * sizeof(Datum));

		for (int i = 0; i < req->ncolumns; i++)
			names[i] = name_datum(get_attname(req->relid, req->columns[i], false));
		values[9] = PointerGetDatum(construct_array(names, req->ncolumns, NAMEOID,
													NAMEDATALEN, false, TYPALIGN_CHAR));
	}
	else
		nulls[9] = 'n';

	execute_with_args("INSERT INTO portal_sync.source AS s (relid, kind, name,"
					  "  patient_col, key_col, date_col, privacy_col, share_when, enroll_when, columns)"
					  " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
					  " ON CONFLICT (relid) DO UPDATE SET kind = excluded.kind,"
					  "  name = excluded.name, patient_col = excluded.patient_col,"
					  "  key_col = excluded.key_col, date_col = excluded.date_col,"
					  "  privacy_col = excluded.privacy_col, share_when = excluded.share_when,"
					  "  enroll_when = excluded.enroll_when, columns = excluded.columns,"
					  "  attached_at = pg_catalog.now()",
					  10, types, values, nulls, SPI_OK_INSERT);
}

/*
 * Insert or replace the table's row of portal_sync.source in a 1.0
 * schema (before ALTER EXTENSION ... UPDATE): attribute numbers and node
 * trees, no columns list; the update converts them.
 */
static void
store_source_version_1_0(AttachRequest *req)
{
	Oid			types[11] = {OIDOID, TEXTOID, TEXTOID, INT2OID, INT2OID, INT2OID,
	INT2OID, TEXTOID, PG_NODE_TREEOID, TEXTOID, PG_NODE_TREEOID};
	Datum		values[11];
	char		nulls[12] = "           ";

	values[0] = ObjectIdGetDatum(req->relid);
	values[1] = CStringGetTextDatum(req->kind_name);
	values[2] = CStringGetTextDatum(req->name);
	values[3] = Int16GetDatum(req->patient_attnum);
	values[4] = Int16GetDatum(req->key_attnum);
	values[5] = Int16GetDatum(req->date_attnum);
	values[6] = Int16GetDatum(req->privacy_attnum);
	if (req->date_attnum == InvalidAttrNumber)
		nulls[5] = 'n';
	if (req->privacy_attnum == InvalidAttrNumber)
		nulls[6] = 'n';
	if (req->share_when != NULL)
	{
		values[7] = CStringGetTextDatum(req->share_when_text);
		values[8] = CStringGetTextDatum(nodeToString(req->share_when));
	}
	else
		nulls[7] = nulls[8] = 'n';
	if (req->enroll_when != NULL)
	{
		values[9] = CStringGetTextDatum(req->enroll_when_text);
		values[10] = CStringGetTextDatum(nodeToString(req->enroll_when));
	}
	else
		nulls[9] = nulls[10] = 'n';

	execute_with_args("INSERT INTO portal_sync.source AS s (relid, kind, name,"
					  "  patient_attnum, key_attnum, date_attnum, privacy_attnum,"
					  "  share_when_text, share_when, enroll_when_text, enroll_when)"
					  " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
					  " ON CONFLICT (relid) DO UPDATE SET kind = excluded.kind,"
					  "  name = excluded.name, patient_attnum = excluded.patient_attnum,"
					  "  key_attnum = excluded.key_attnum, date_attnum = excluded.date_attnum,"
					  "  privacy_attnum = excluded.privacy_attnum,"
					  "  share_when_text = excluded.share_when_text,"
					  "  share_when = excluded.share_when,"
					  "  enroll_when_text = excluded.enroll_when_text,"
					  "  enroll_when = excluded.enroll_when,"
					  "  attached_at = pg_catalog.now()",
					  11, types, values, nulls, SPI_OK_INSERT);
}

/*
 * The schema-qualified, quoted name of a relation, for generated SQL.
 */
static char *
relation_qualified_name(Oid relid)
{
	return quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
									  get_rel_name(relid));
}

/*
 * Drop the capture triggers of one table, those that exist.  The caller
 * is connected to SPI, as the extension's owner.
 */
void
drop_capture_triggers(Oid relid)
{
	char	   *qualified_name = relation_qualified_name(relid);

	for (int i = 0; i < lengthof(capture_triggers); i++)
	{
		char	   *sql;

		if (!OidIsValid(get_trigger_oid(relid, capture_triggers[i].name, true)))
			continue;
		sql = psprintf("DROP TRIGGER %s ON %s",
					   quote_identifier(capture_triggers[i].name),
					   qualified_name);
		if (SPI_execute(sql, false, 0) != SPI_OK_UTILITY)
			elog(ERROR, "dropping trigger %s failed", capture_triggers[i].name);
	}
}

/*
 * Create the capture triggers of one table that it does not have yet (a
 * partition of an attached table, or the attached table itself).  The
 * caller is connected to SPI, as the extension's owner.
 */
void
add_capture_triggers(Oid relid)
{
	char	   *qualified_name = relation_qualified_name(relid);
	bool		created = false;

	for (int i = 0; i < lengthof(capture_triggers); i++)
	{
		char	   *event;
		bool		before;
		char	   *sql;

		if (OidIsValid(get_trigger_oid(relid, capture_triggers[i].name, true)))
			continue;
		created = true;
		event = psprintf(capture_triggers[i].definition, qualified_name);
		before = strncmp(event, "TRUNCATE", 8) == 0;
		sql = psprintf("CREATE TRIGGER %s %s %s FOR EACH STATEMENT"
					   " EXECUTE FUNCTION portal_sync.capture()",
					   quote_identifier(capture_triggers[i].name),
					   before ? "BEFORE" : "AFTER", event);
		if (SPI_execute(sql, false, 0) != SPI_OK_UTILITY)
			elog(ERROR, "creating trigger %s failed", capture_triggers[i].name);
	}
	if (created)
		CommandCounterIncrement();
}

/*
 * Every partition of a table, at every level, without the table itself
 * (NIL for a table that is not partitioned), locked in the given mode.
 */
List *
partitions_of(Oid relid, LOCKMODE lockmode)
{
	if (get_rel_relkind(relid) != RELKIND_PARTITIONED_TABLE)
		return NIL;
	return list_delete_first(find_all_inheritors(relid, lockmode, NULL));
}

/*
 * Make the insert trigger of an attached table depend on every column
 * portal_sync reads, as its stored settings name them, so that they cannot
 * be dropped or retyped while the table is attached.  Called by attach(),
 * and when a restore (or anyone) creates the insert trigger of a table
 * whose settings are there already: dependencies are not dumped.
 */
void
record_capture_dependencies(Oid relid)
{
	StoredSource stored;
	ObjectAddress trigger;
	AttrNumber	columns[4];

	if (!source_settings_read(relid, &stored))
		return;
	columns[0] = stored.patient_attnum;
	columns[1] = stored.key_attnum;
	columns[2] = stored.date_attnum;
	columns[3] = stored.privacy_attnum;
	ObjectAddressSet(trigger, TriggerRelationId,
					 get_trigger_oid(relid, capture_triggers[0].name, false));

	for (int i = 0; i < lengthof(columns); i++)
	{
		ObjectAddress column;

		if (columns[i] == InvalidAttrNumber)
			continue;
		ObjectAddressSubSet(column, RelationRelationId, relid, columns[i]);
		recordDependencyOn(&trigger, &column, DEPENDENCY_NORMAL);
	}
	/* the columns sent in data, like the others */
	for (int i = 0; i < stored.ncolumns; i++)
	{
		ObjectAddress column;

		ObjectAddressSubSet(column, RelationRelationId, relid, stored.columns[i]);
		recordDependencyOn(&trigger, &column, DEPENDENCY_NORMAL);
	}
	if (stored.share_when != NULL)
		recordDependencyOnSingleRelExpr(&trigger, stored.share_when, relid,
										DEPENDENCY_NORMAL, DEPENDENCY_NORMAL, false);
	if (stored.enroll_when != NULL)
		recordDependencyOnSingleRelExpr(&trigger, stored.enroll_when, relid,
										DEPENDENCY_NORMAL, DEPENDENCY_NORMAL, false);
}

/*
 * Record the dependencies of every attached table's capture insert trigger
 * that has none: pg_upgrade recreates the triggers before the settings'
 * data is back, and so without them.  adopt(), which an upgraded cluster
 * needs anyway, calls it.  The caller is connected to SPI.
 */
void
repair_capture_dependencies(void)
{
	List	   *relids = NIL;
	ListCell   *lc;

	if (SPI_execute("SELECT s.relid::pg_catalog.oid FROM portal_sync.source s"
					" JOIN pg_catalog.pg_trigger t"
					"   ON t.tgrelid = s.relid AND t.tgname = 'portal_sync_capture_insert'"
					" WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d"
					"   WHERE d.classid = 'pg_catalog.pg_trigger'::pg_catalog.regclass"
					"     AND d.objid = t.oid AND d.refobjsubid > 0)",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading the capture triggers failed");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;

		relids = lappend_oid(relids, DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[i],
																	SPI_tuptable->tupdesc, 1, &isnull)));
	}
	foreach(lc, relids)
	{
		Relation	rel = table_open(lfirst_oid(lc), ShareRowExclusiveLock);

		record_capture_dependencies(RelationGetRelid(rel));
		table_close(rel, NoLock);
	}
	CommandCounterIncrement();
}

/*
 * Is attach() creating capture triggers?  It records their dependencies
 * itself, so the utility hook must not record them twice.
 */
bool
attach_is_creating_triggers(void)
{
	return creating_triggers;
}

/*
 * Create the capture triggers of a table and, for a partitioned table, of
 * every partition: a statement fires the triggers of the table it names
 * only.  Re-attaching replaces them.
 */
static void
create_capture_triggers(AttachRequest *req)
{
	List	   *partitions = partitions_of(req->relid, ShareRowExclusiveLock);
	ListCell   *lc;

	creating_triggers = true;
	PG_TRY();
	{
		drop_capture_triggers(req->relid);
		add_capture_triggers(req->relid);
		foreach(lc, partitions)
		{
			drop_capture_triggers(lfirst_oid(lc));
			add_capture_triggers(lfirst_oid(lc));
			CacheInvalidateRelcacheByRelid(lfirst_oid(lc));
		}
	}
	PG_FINALLY();
	{
		creating_triggers = false;
	}
	PG_END_TRY();
	CommandCounterIncrement();
	record_capture_dependencies(req->relid);
}

/*
 * Refuse a partitioned table one of whose partitions is attached on its
 * own (it was attached before it became a partition): its rows would be
 * two sources at once.
 */
static void
check_no_attached_partition(AttachRequest *req)
{
	List	   *partitions = partitions_of(req->relid, NoLock);
	ListCell   *lc;

	foreach(lc, partitions)
	{
		Oid			types[1] = {OIDOID};
		Datum		values[1] = {ObjectIdGetDatum(lfirst_oid(lc))};

		execute_with_args("SELECT 1 FROM portal_sync.source WHERE relid = $1",
						  1, types, values, NULL, SPI_OK_SELECT);
		if (SPI_processed > 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("partition \"%s\" of \"%s\" is attached to portal_sync on its own",
							get_rel_name(lfirst_oid(lc)), get_rel_name(req->relid)),
					 errhint("Detach it with portal_sync.detach(), then attach the partitioned table.")));
	}
}

/*
 * portal_sync.attach(source regclass, kind text, patient_col name,
 *					  key_col name, date_col name, privacy_col name,
 *					  share_when text, enroll_when text, name text,
 *					  columns name[])
 *
 * Attach (or re-attach, replacing its settings) an EHR table.
 */
Datum
portal_sync_attach(PG_FUNCTION_ARGS)
{
	AttachRequest req;
	Relation	rel;
	ExtensionOwnerContext owner;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("source must be given")));

	memset(&req, 0, sizeof(req));
	rel = table_open(PG_GETARG_OID(0), ShareRowExclusiveLock);
	check_attach_request(rel, fcinfo, &req);

	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	check_name_is_free(&req);
	check_single_chart(&req);
	check_patient_type(&req, rel);
	check_key_type(&req, rel);
	check_no_attached_partition(&req);
	if (source_settings_by_name())
		store_source(&req, rel);
	else
		store_source_version_1_0(&req);
	create_capture_triggers(&req);

	SPI_finish();
	restore_user(&owner);

	/* capture (this table) and the delivery worker (the source list) */
	CacheInvalidateRelcache(rel);
	CacheInvalidateRelcacheByRelid(portal_sync_relid("source"));
	table_close(rel, NoLock);
	PG_RETURN_VOID();
}

/*
 * Refuse to detach a partition of an attached table: it is captured with
 * its partitioned table, and dropping its triggers alone would silently
 * stop capturing its rows.
 */
static void
check_not_captured_partition(Relation rel)
{
	SourceConfig *config;

	if (!rel->rd_rel->relispartition)
		return;
	config = source_config_lookup(RelationGetRelid(rel));
	if (config != NULL && config->attached_relid != RelationGetRelid(rel))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is a partition of the attached table \"%s\"",
						RelationGetRelationName(rel), get_rel_name(config->attached_relid)),
				 errhint("Detach the partitioned table %s, or take the partition out of it with ALTER TABLE ... DETACH PARTITION.",
						 relation_qualified_name(config->attached_relid))));
}

/*
 * portal_sync.detach(source regclass, retract boolean DEFAULT false)
 *
 * Stop capturing a table: drop its triggers and its settings.  Without
 * retract, the portal keeps what it has and the events of the table not
 * sent yet are dropped; with retract, a delete of every item of it the
 * portal may hold is queued and delivered (retraction.c).  1.0's
 * detach(regclass) calls this with one argument.
 */
Datum
portal_sync_detach(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	bool		retract = PG_NARGS() > 1 && PG_GETARG_BOOL(1);
	Relation	rel = table_open(relid, ShareRowExclusiveLock);
	ExtensionOwnerContext owner;
	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(relid)};
	bool		isnull;
	ListCell   *lc;

	if (!pg_class_ownercheck(relid, GetUserId()))
		aclcheck_error(ACLCHECK_NOT_OWNER, get_relkind_objtype(rel->rd_rel->relkind),
					   RelationGetRelationName(rel));
	check_not_captured_partition(rel);

	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	/* every column: a 1.0 schema names them otherwise, and has no retract */
	execute_with_args("DELETE FROM portal_sync.source WHERE relid = $1 RETURNING *",
					  1, types, values, NULL, SPI_OK_DELETE_RETURNING);
	if (SPI_processed > 0 && retract)
	{
		HeapTuple	tuple = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;

		queue_retraction(rel,
						 DatumGetInt32(SPI_getbinval(tuple, desc, SPI_fnumber(desc, "source_id"), &isnull)),
						 SPI_getvalue(tuple, desc, SPI_fnumber(desc, "kind")),
						 SPI_getvalue(tuple, desc, SPI_fnumber(desc, "name")),
						 SPI_getvalue(tuple, desc, SPI_fnumber(desc, "patient_col")),
						 SPI_getvalue(tuple, desc, SPI_fnumber(desc, "key_col")));
	}
	else if (SPI_processed > 0)
	{
		types[0] = INT4OID;
		values[0] = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		execute_with_args("DELETE FROM portal_sync.outbox WHERE source_id = $1",
						  1, types, values, NULL, SPI_OK_DELETE);
	}
	else if (!OidIsValid(get_trigger_oid(relid, capture_triggers[0].name, true)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("\"%s\" is not attached to portal_sync", RelationGetRelationName(rel))));
	drop_capture_triggers(relid);
	/* and from every partition of a partitioned table */
	foreach(lc, partitions_of(relid, ShareRowExclusiveLock))
	{
		drop_capture_triggers(lfirst_oid(lc));
		CacheInvalidateRelcacheByRelid(lfirst_oid(lc));
	}

	SPI_finish();
	restore_user(&owner);

	/* capture (this table) and the delivery worker (the source list) */
	CacheInvalidateRelcache(rel);
	CacheInvalidateRelcacheByRelid(portal_sync_relid("source"));
	table_close(rel, NoLock);
	PG_RETURN_VOID();
}
