/*
 * gw_inflight.h - the process-wide count of requests being handled, which
 * "max_inflight" bounds. Shared by every worker: one atomic counter,
 * changed with compare-and-swap so it never goes past the limit even for a
 * moment (a request is refused only when the limit is really reached).
 *
 * A request holds one unit from the moment it is routed until its response
 * is complete or its connection dies; gw_conn.c keeps a per-connection flag
 * so every path that ends a request gives the unit back exactly once.
 */
#ifndef GW_INFLIGHT_H
#define GW_INFLIGHT_H

#include "gw_core.h"

/* Takes one unit unless max (>= 1) are taken already. True when taken:
 * the request goes on and calls gw_inflight_release() once at its end. */
bool gw_inflight_acquire(unsigned max);
void gw_inflight_release(void);
/* Units held now (tests, metrics). */
unsigned gw_inflight_current(void);

#endif
