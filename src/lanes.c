/*-------------------------------------------------------------------------
 *
 * lanes.c
 *		Splitting a delivery unit by patient, for requests in flight.
 *
 * Up to portal_sync.max_inflight requests are in flight at once, each for
 * a disjoint set of patients: a later event of a patient is never sent
 * while an earlier one is unanswered.  So the events of a unit are split
 * into lanes that each hold whole patients.  A lane's batches go one after
 * the other; the lanes go side by side.  The split is stable: within a
 * lane the events keep the unit's order, which is every patient's seq
 * order.  Each patient goes to the lane with the fewest events so far, in
 * the order the patients first appear, so that the lanes' first batches
 * are about equally full and go out together.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "delivery.h"
#include "string_map.h"

/* Where one patient's events go. */
typedef struct PatientLane
{
	const char *patient_id;		/* hash key */
	int			lane;			/* -1: not placed yet */
	int			events;			/* the patient's events in the unit */
} PatientLane;

/*
 * Reorder unit->events so that lane l is events [starts[l], starts[l+1]),
 * for at most max_lanes lanes; returns how many lanes hold events.
 * starts needs room for max_lanes + 1 entries.
 */
int
split_unit_into_lanes(DeliveryUnit *unit, int max_lanes, int *starts)
{
	int			nevents = list_length(unit->events);
	HTAB	   *patients;
	PatientLane **order;
	PatientLane **event_lane;
	int			npatients = 0;
	int		   *load;
	List	  **lanes;
	List	   *events = NIL;
	int			nlanes = 0;
	int			i;
	MemoryContext oldcontext;

	if (nevents == 0)
	{
		starts[0] = 0;
		return 0;
	}

	patients = string_map_create("portal_sync lanes", sizeof(PatientLane), CurrentMemoryContext);
	order = palloc(nevents * sizeof(PatientLane *));
	event_lane = palloc(nevents * sizeof(PatientLane *));
	load = palloc0(max_lanes * sizeof(int));
	for (i = 0; i < nevents; i++)
	{
		DeliveryEvent *event = list_nth(unit->events, i);
		bool		found;
		PatientLane *patient = string_map_enter(patients, event->patient_id, &found);

		if (!found)
		{
			patient->lane = -1;
			patient->events = 0;
			order[npatients++] = patient;
		}
		patient->events++;
		event_lane[i] = patient;
	}

	for (i = 0; i < npatients; i++)
	{
		int			lightest = 0;

		for (int l = 1; l < max_lanes; l++)
			if (load[l] < load[lightest])
				lightest = l;
		order[i]->lane = lightest;
		load[lightest] += order[i]->events;
	}

	oldcontext = MemoryContextSwitchTo(unit->context);
	lanes = palloc0(max_lanes * sizeof(List *));
	for (i = 0; i < nevents; i++)
		lanes[event_lane[i]->lane] = lappend(lanes[event_lane[i]->lane],
											 list_nth(unit->events, i));
	for (int l = 0; l < max_lanes; l++)
	{
		if (lanes[l] == NIL)
			continue;
		starts[nlanes++] = list_length(events);
		events = list_concat(events, lanes[l]);
		list_free(lanes[l]);
	}
	starts[nlanes] = list_length(events);
	Assert(list_length(events) == nevents);
	list_free(unit->events);
	unit->events = events;
	pfree(lanes);
	MemoryContextSwitchTo(oldcontext);

	hash_destroy(patients);
	pfree(order);
	pfree(event_lane);
	pfree(load);
	return nlanes;
}
