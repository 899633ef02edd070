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

/* The request of a cached call, as its client request rendered it. All
 * borrowed for the call of gw_fetch_lookup() (a fetch copies them). */
typedef struct {
    const char *head;  /* the head, as the exchange sends it but for each server's Host value */
    size_t head_len;
    size_t host_off;   /* where each try's server writes its Host value (gw_xchg_t.host_off); 0: none */
    const char *body;  /* the rendered body; NULL: none */
    size_t body_len;
    uint64_t hash;     /* with has_hash: the hash of the backend's hash_key for the request (hash balance) */
    bool has_hash;
    const char *rid;   /* the client request's id and address, for the fetch's log lines */
    const char *peer;
} gw_fetch_req_t;

/*
 * Looks up the request rq of call (the key: its head and body; the Host
 * value and the hash are not in it, as every server of the backend gives
 * the same answer) in the call's scope on worker w, and starts the fetch
 * when the lookup asks for one (LEAD, or a STALE answer to refresh): see
 * gw_cache_lookup() for ask. The fetch's exchange balances as the call's
 * would: rq's hash picks its server on a hash-balanced backend, and a
 * failed try goes to the next server as the backend's retries say. The
 * caller's request must run on w's current configuration (the fetch takes
 * a reference to it).
 */
gw_cache_result_t gw_fetch_lookup(gw_worker_t *w, const gw_call_t *call, const gw_fetch_req_t *rq,
                                  gw_cache_ask_t *ask);

/* Ends every fetch of w (its thread, after its loop ended, before its
 * port is freed): their flights fail with "unavailable". */
void gw_fetch_worker_stop(gw_worker_t *w);
/* Frees what w kept for its fetches (after its port was freed). */
void gw_fetch_worker_free(gw_worker_t *w);

#endif
