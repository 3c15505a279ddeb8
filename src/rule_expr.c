/*-------------------------------------------------------------------------
 *
 * rule_expr.c
 *		The share_when and enroll_when expressions of attached tables.
 *
 * A rule is a boolean expression over the columns of one row of the
 * attached table.  It is checked when the table is attached and kept as
 * SQL text, deparsed from the analyzed expression with search_path set to
 * pg_catalog alone, so that every name outside pg_catalog is qualified:
 * the text means the same whatever the search_path of whoever reads it,
 * and, unlike a node tree, a dump and restore or pg_upgrade carry it.
 * Capture parses and analyzes it again, with the same search_path, when it
 * loads the settings (once per invalidation, never per row).  Renaming a
 * column the rule reads deparses it again (attachment_ddl.c).  Only
 * built-in, non-volatile functions and operators are allowed and it cannot
 * hold a subquery: a rule can never run a statement or read another table.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/sysattr.h"
#include "access/transam.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "parser/parse_coerce.h"
#include "parser/parse_collate.h"
#include "parser/parse_expr.h"
#include "parser/parse_relation.h"
#include "parser/parser.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "portal_sync.h"

/*
 * Built-in functions that are not volatile and yet read the contents of
 * tables, or settings (the worker evaluates rules as a superuser, who may
 * read the token): a rule must not call them.
 */
static const char *const table_reading_functions[] = {
	"table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
	"schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
	"database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
	"cursor_to_xml", "cursor_to_xmlschema",
	"query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
	"current_setting",			/* would read portal_sync.auth_token */
	NULL
};

/*
 * May a rule call this function?  Only built-in ones, and not those that
 * read tables: user-defined functions could do anything.
 */
static bool
function_is_forbidden(Oid funcid, void *context)
{
	char	   *name;

	if (funcid >= FirstUnpinnedObjectId)
		return true;
	name = get_func_name(funcid);
	for (int i = 0; name != NULL && table_reading_functions[i] != NULL; i++)
	{
		if (strcmp(name, table_reading_functions[i]) == 0)
			return true;
	}
	return false;
}

/*
 * Walker that finds the first forbidden function or operator of a rule,
 * including those hidden in the CHECK constraints of a user-defined
 * domain that the rule casts to.
 */
static bool
contains_forbidden_function(Node *node, void *context)
{
	if (node == NULL)
		return false;
	if (check_functions_in_node(node, function_is_forbidden, context))
		return true;
	if (IsA(node, CoerceToDomain) &&
		((CoerceToDomain *) node)->resulttype >= FirstUnpinnedObjectId)
		return true;
	return expression_tree_walker(node, contains_forbidden_function, context);
}

/* What an error context callback needs to point into a rule's text. */
typedef struct RuleErrorContext
{
	const char *what;
	const char *query;			/* the text as parsed */
} RuleErrorContext;

/*
 * Error context callback: report a position in the rule as a position in
 * the rule's own text, not in the statement that called attach().
 */
static void
rule_error_callback(void *arg)
{
	RuleErrorContext *context = (RuleErrorContext *) arg;
	int			position = geterrposition();

	if (position > 0)
	{
		errposition(0);
		internalerrposition(position);
		internalerrquery(context->query);
	}
	errcontext("checking %s", context->what);
}

/*
 * Parse the text of a rule into the raw tree of one expression.  The text is
 * parsed as the target of a SELECT, and anything but one plain target
 * expression (a second statement, a FROM, a WHERE...) is refused.
 */
static Node *
parse_rule_text(const char *text, const char *what)
{
	char	   *sql = psprintf("SELECT %s", text);
	List	   *raw_statements;
	RawStmt    *raw;
	SelectStmt *select;
	ResTarget  *target;
	RuleErrorContext context = {what, sql};
	ErrorContextCallback callback = {error_context_stack, rule_error_callback, &context};

	error_context_stack = &callback;
	raw_statements = raw_parser(sql, RAW_PARSE_DEFAULT);
	error_context_stack = callback.previous;

	if (list_length(raw_statements) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be one expression", what)));

	raw = linitial_node(RawStmt, raw_statements);
	if (!IsA(raw->stmt, SelectStmt))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be one expression", what)));

	select = (SelectStmt *) raw->stmt;
	if (select->op != SETOP_NONE ||
		list_length(select->targetList) != 1 ||
		select->distinctClause != NIL ||
		select->intoClause != NULL ||
		select->fromClause != NIL ||
		select->whereClause != NULL ||
		select->groupClause != NIL ||
		select->havingClause != NULL ||
		select->windowClause != NIL ||
		select->valuesLists != NIL ||
		select->sortClause != NIL ||
		select->limitOffset != NULL ||
		select->limitCount != NULL ||
		select->lockingClause != NIL ||
		select->withClause != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be one expression over the columns of the row", what)));

	target = linitial_node(ResTarget, select->targetList);
	if (target->name != NULL || IsA(target->val, A_Star) ||
		(IsA(target->val, ColumnRef) &&
		 IsA(llast(((ColumnRef *) target->val)->fields), A_Star)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be one expression over the columns of the row", what)));

	return target->val;
}

/*
 * Check a rule against the attached relation and return it analyzed,
 * ready to be stored with nodeToString().  "what" names the rule in error
 * messages (share_when or enroll_when).
 */
Node *
rule_expr_compile(Relation rel, const char *text, const char *what)
{
	Node	   *raw_expr = parse_rule_text(text, what);
	ParseState *pstate = make_parsestate(NULL);
	ParseNamespaceItem *nsitem;
	Node	   *expr;
	RuleErrorContext context = {what, psprintf("SELECT %s", text)};
	ErrorContextCallback callback = {error_context_stack, rule_error_callback, &context};

	error_context_stack = &callback;
	pstate->p_sourcetext = context.query;
	nsitem = addRangeTableEntryForRelation(pstate, rel, AccessShareLock,
										   NULL, false, true);
	addNSItemToQuery(pstate, nsitem, true, true, true);

	expr = transformExpr(pstate, raw_expr, EXPR_KIND_WHERE);

	if (pstate->p_hasSubLinks)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s cannot contain a subquery", what),
				 errhint("A rule may only use the columns of the row itself.")));

	expr = coerce_to_boolean(pstate, expr, what);
	assign_expr_collations(pstate, expr);

	/*
	 * The whole row would be stored under the table's name, which a
	 * partition, a rename or a restore does not keep: capture would fail.
	 */
	{
		Bitmapset  *attnums = NULL;

		pull_varattnos(expr, 1, &attnums);
		if (bms_is_member(0 - FirstLowInvalidHeapAttributeNumber, attnums))
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("%s cannot use the whole row", what),
					 errhint("Name the columns the rule reads.")));
	}

	if (contain_volatile_functions(expr))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s cannot use volatile functions", what)));

	if (contains_forbidden_function(expr, NULL))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s can only use built-in functions, operators and types that do not read tables", what),
				 errhint("A rule may only use the columns of the row itself.")));

	error_context_stack = callback.previous;
	free_parsestate(pstate);
	return expr;
}

/*
 * Turn a rule as a 1.0 schema stores it (a node tree, before ALTER
 * EXTENSION ... UPDATE) back into an analyzed expression.
 */
Node *
rule_expr_load_node_tree(const char *node_string)
{
	return stringToNode(node_string);
}

/*
 * Set search_path to pg_catalog alone until the returned nest level is
 * closed with AtEOXact_GUC(true, level): stored rules are deparsed and
 * parsed under it, so that their text does not depend on the session.
 */
static int
stored_rule_search_path(void)
{
	int			level = NewGUCNestLevel();

	(void) set_config_option("search_path", "pg_catalog", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	return level;
}

/*
 * The text a rule is stored as: the analyzed expression deparsed over the
 * relation's columns, names outside pg_catalog qualified.
 */
char *
rule_expr_deparse(Relation rel, Node *expr)
{
	int			level = stored_rule_search_path();
	Datum		deparsed;

	deparsed = DirectFunctionCall2(pg_get_expr, CStringGetTextDatum(nodeToString(expr)),
							   ObjectIdGetDatum(RelationGetRelid(rel)));
	AtEOXact_GUC(true, level);
	return TextDatumGetCString(deparsed);
}

/*
 * A stored rule analyzed against the relation as it is now (its columns
 * by name), checked as attach() checks it.
 */
Node *
rule_expr_analyze_stored(Relation rel, const char *text, const char *what)
{
	int			level = stored_rule_search_path();
	Node	   *expr = rule_expr_compile(rel, text, what);

	AtEOXact_GUC(true, level);
	return expr;
}
