/*
 * gw_fetch.h - the upstream request of a cached or coalesced aggregate
 * call: the one request a flight of the cache (gw_cache.h) sends for every
 * request that waits on it, and the background revalidation of a stale
 * answer.
 *
 * A fetch belongs to the cache, not to the client request that caused it:
 * it runs on that request's worker (its pools, its loop) with a reference
 * to the worker's current configuration, to the call's timeout_ms (never
 * the route's deadline of one request), with the backend's retries (no
 * hedges: it has no request of its own to hedge for), breaker, queue and
 * metrics, through gw_exchange. A client that leaves or whose deadline
 * passes only stops waiting; the fetch ends on its own and gives its
 * answer to the cache and to whoever still waits. A 2xx body is checked to
 * be JSON (on the thread pool when large) before it is stored.
 *
 * Worker thread only; every fetch of a worker ends with it
 * (gw_fetch_worker_stop, its waiters get "unavailable").
 */
#ifndef GW_FETCH_H
#define GW_FETCH_H

#include "gw_cache.h"
#include "gw_core.h"

/*
 * Looks up the request of call (its head, as the exchange would send it,
 * and its rendered body, may be NULL) in the call's scope on worker w,
 * and starts the fetch when the lookup asks for one (LEAD, or a STALE
 * answer to refresh): see gw_cache_lookup() for ask. rid and peer: the
 * client request's id and address, for the fetch's log lines (copied).
 * The caller's request must run on w's current configuration (the fetch
 * takes a reference to it).
 */
gw_cache_result_t gw_fetch_lookup(gw_worker_t *w, const gw_call_t *call, const char *head, size_t head_len,
                                  const char *body, size_t body_len, const char *rid, const char *peer,
                                  gw_cache_ask_t *ask);

/* Ends every fetch of w (its thread, after its loop ended, before its
 * port is freed): their flights fail with "unavailable". */
void gw_fetch_worker_stop(gw_worker_t *w);
/* Frees what w kept for its fetches (after its port was freed). */
void gw_fetch_worker_free(gw_worker_t *w);

#endif
