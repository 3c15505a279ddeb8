/*-------------------------------------------------------------------------
 *
 * fuzz_rule_expr.c
 *		libFuzzer target for the share_when / enroll_when validation,
 *		running inside a PostgreSQL backend.
 *
 * rule_expr_compile() (src/rule_expr.c) needs the backend's parser,
 * analyzer and catalogs, so this target is a loadable module, compiled with
 * the real src/rule_expr.c and clang's -fsanitize=fuzzer-no-link, that
 * hands control to libFuzzer (LLVMFuzzerRunDriver) from a SQL function
 * called in a single-user backend (test/fuzz/rule_fuzz.sh).  Each input is
 * the text of a rule, compiled against the relation given to the function
 * inside a subtransaction.  Findings (libFuzzer writes the input as
 * crash-*):
 *
 *	- a crash or a sanitizer trap (UBSan in trap mode; ASan when the server
 *	  runs with it preloaded, as test/sanitize.sh's copy does);
 *	- an internal error (SQLSTATE XX000) instead of a clean rejection;
 *	- an accepted rule that could read anything but the row: a subquery, a
 *	  parameter, a column of another level or relation, a user-defined or
 *	  volatile function (checked with PostgreSQL's own node walkers, not
 *	  with rule_expr.c's), or that is not boolean;
 *	- an accepted rule whose stored form (its deparsed text) is refused
 *	  when analyzed again, means another rule, or changes each time it
 *	  is written.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/resowner.h"

#include "portal_sync.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(portal_sync_fuzz_rule_expr);

extern int	LLVMFuzzerRunDriver(int *argc, char ***argv,
								int (*callback) (const uint8_t *data, size_t size));

/* The attached table the rules are compiled against, for one run. */
static Relation fuzz_relation;

/* Reset after every input. */
static MemoryContext input_context;

/* Counters printed at the end of the run. */
static uint64 inputs_accepted;
static uint64 inputs_rejected;

/*
 * libFuzzer ends the process with exit(): print the counters from atexit.
 */
static void
print_counters(void)
{
	fprintf(stderr, "fuzz_rule_expr: %llu rules accepted, %llu rejected\n",
			(unsigned long long) inputs_accepted,
			(unsigned long long) inputs_rejected);
}

/*
 * Report an oracle violation and abort: libFuzzer's SIGABRT handler saves
 * the input as a crash artifact and ends the run with a failure.
 */
static void
finding(const char *what, const char *text)
{
	fprintf(stderr, "fuzz_rule_expr: FINDING: %s\n  rule: %s\n", what, text);
	fflush(stderr);
	abort();
}

/*
 * Is this function one a rule must never call: user-defined (anything
 * could be behind it) or volatile?
 */
static bool
function_not_allowed(Oid funcid, void *context)
{
	return funcid >= FirstNormalObjectId ||
		func_volatile(funcid) == PROVOLATILE_VOLATILE;
}

/*
 * Does this analyzed expression reach outside the row it is evaluated on?
 * Only Vars of the one relation (varno 1, level 0) may appear.
 */
static bool
reaches_outside_row(Node *node, void *context)
{
	if (node == NULL)
		return false;
	if (IsA(node, SubLink) || IsA(node, SubPlan) || IsA(node, Param) ||
		IsA(node, NextValueExpr) || IsA(node, CurrentOfExpr))
		return true;
	if (IsA(node, Var))
	{
		Var		   *var = (Var *) node;

		return var->varno != 1 || var->varlevelsup != 0;
	}
	if (check_functions_in_node(node, function_not_allowed, NULL))
		return true;
	return expression_tree_walker(node, reaches_outside_row, context);
}

/*
 * A stored rule text analyzed again; any error is a finding: attach()
 * accepted the rule, so its stored form must load.
 */
static Node *
read_back_stored(const char *stored, const char *text)
{
	Node	   *read_back = NULL;

	PG_TRY();
	{
		read_back = rule_expr_analyze_stored(fuzz_relation, stored, "share_when");
	}
	PG_CATCH();
	{
		ErrorData  *error = CopyErrorData();

		finding(psprintf("stored rule text is refused when read back (%s): %s",
						 error->message, stored), text);
	}
	PG_END_TRY();
	return read_back;
}

/*
 * The oracles for a rule that rule_expr_compile() accepted.  A rule is
 * stored as its deparsed text (rule_expr_deparse) and analyzed again from
 * it whenever it is loaded, and deparsed again when DDL rewrites it.  That
 * text must load, mean the same rule (the trees equal once the planner's
 * own simplification has flattened nested ANDs and ORs, which deparsing
 * writes as parentheses and parsing flattens), and be stable from its
 * second writing on.
 */
static void
check_accepted_rule(Node *expr, const char *text)
{
	char	   *stored;
	char	   *rewritten;
	Node	   *read_back;

	if (exprType(expr) != BOOLOID)
		finding("accepted rule is not boolean", text);
	if (reaches_outside_row(expr, NULL))
		finding("accepted rule reaches outside the row", text);
	if (contain_volatile_functions(expr))
		finding("accepted rule is volatile", text);

	stored = rule_expr_deparse(fuzz_relation, expr);
	read_back = read_back_stored(stored, text);
	if (!equal(eval_const_expressions(NULL, copyObject(expr)),
			   eval_const_expressions(NULL, copyObject(read_back))))
		finding(psprintf("stored rule text reads back as another rule: %s", stored), text);
	rewritten = rule_expr_deparse(fuzz_relation, read_back);
	if (strcmp(rule_expr_deparse(fuzz_relation, read_back_stored(rewritten, text)),
			   rewritten) != 0)
		finding(psprintf("stored rule text changes each time it is written: %s", rewritten), text);
}

/*
 * libFuzzer's callback: compile one rule text in a subtransaction.  An
 * input holding a NUL byte cannot be a SQL text and is refused (-1: not
 * added to the corpus).
 */
static int
fuzz_one_rule(const uint8_t *data, size_t size)
{
	MemoryContext caller_context = CurrentMemoryContext;
	ResourceOwner caller_owner = CurrentResourceOwner;
	char	   *text;

	if (memchr(data, '\0', size) != NULL)
		return -1;

	MemoryContextSwitchTo(input_context);
	text = palloc(size + 1);
	memcpy(text, data, size);
	text[size] = '\0';

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(input_context);
	PG_TRY();
	{
		Node	   *expr = rule_expr_compile(fuzz_relation, text, "share_when");

		check_accepted_rule(expr, text);
		ReleaseCurrentSubTransaction();
		inputs_accepted++;
	}
	PG_CATCH();
	{
		ErrorData  *error;

		MemoryContextSwitchTo(input_context);
		error = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		if (error->sqlerrcode == ERRCODE_INTERNAL_ERROR)
			finding(psprintf("internal error: %s", error->message), text);
		inputs_rejected++;
	}
	PG_END_TRY();

	MemoryContextSwitchTo(caller_context);
	CurrentResourceOwner = caller_owner;
	MemoryContextReset(input_context);
	return 0;
}

/*
 * portal_sync_fuzz_rule_expr(relation regclass, arguments text[]) returns
 * bigint: runs libFuzzer with these command-line arguments (corpus
 * directories, -max_total_time=...) over rules compiled against the
 * relation.  libFuzzer ends the process itself when the run is over (exit
 * status 0) or on a finding (non-zero), so this returns only if libFuzzer
 * does, with the number of accepted rules.
 */
Datum
portal_sync_fuzz_rule_expr(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	ArrayType  *arguments = PG_GETARG_ARRAYTYPE_P(1);
	Datum	   *elements;
	bool	   *nulls;
	int			count;
	int			argc;
	char	  **argv;

	deconstruct_array(arguments, TEXTOID, -1, false, TYPALIGN_INT,
					  &elements, &nulls, &count);
	argv = palloc0(sizeof(char *) * (count + 2));
	argv[0] = "fuzz_rule_expr";
	for (argc = 1; argc <= count; argc++)
		argv[argc] = nulls[argc - 1] ? "" : TextDatumGetCString(elements[argc - 1]);

	fuzz_relation = table_open(relid, AccessShareLock);
	input_context = AllocSetContextCreate(TopMemoryContext, "fuzz_rule_expr input",
										  ALLOCSET_DEFAULT_SIZES);
	atexit(print_counters);
	LLVMFuzzerRunDriver(&argc, &argv, fuzz_one_rule);
	table_close(fuzz_relation, AccessShareLock);
	PG_RETURN_INT64((int64) inputs_accepted);
}
