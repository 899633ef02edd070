/*
 * gw_agg.c - aggregate routes (see gw_agg.h). Work in progress: the
 * configuration does not accept aggregate routes yet, so this is never
 * reached.
 */
#include "gw_agg.h"
#include "gw_conn.h"
#include "gw_router.h"

void
gw_agg_start(gw_conn_t *c, const gw_match_t *m)
{
    GW_UNUSED(m);
    gw_conn_error(c, 500, "internal", "");
}

void
gw_agg_worker_free(gw_worker_t *w)
{
    GW_UNUSED(w);
}
