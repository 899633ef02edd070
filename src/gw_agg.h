/*
 * gw_agg.h - aggregate routes: one client request fans out to the route's
 * backend calls, concurrently where their dependencies allow, under the
 * route's deadline; their JSON answers are shaped and merged into one
 * document. See README "Aggregate routes" for the semantics users rely on.
 */
#ifndef GW_AGG_H
#define GW_AGG_H

#include "gw_core.h"

/* Starts the aggregate route of m (borrowed: copied) for connection c's
 * current request, whose body (if any) was read whole. */
void gw_agg_start(gw_conn_t *c, const gw_match_t *m);

/* Frees what worker w keeps cached for aggregate requests (worker stop). */
void gw_agg_worker_free(gw_worker_t *w);

#endif
