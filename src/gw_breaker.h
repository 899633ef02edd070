/*
 * gw_breaker.h - the circuit breaker of a backend ("circuit_breaker").
 *
 * Every call to a backend with a breaker asks gw_breaker_admit() first and
 * reports how it went with gw_breaker_done() (or gw_breaker_abandon() when
 * it was cancelled and says nothing about the backend). The breaker is
 * closed (calls pass) until consecutive_failures calls in a row failed, or
 * until, over the last window_ms with at least min_requests calls, the
 * share of failures exceeds failure_ratio. It is then open: calls fail at
 * once with GW_FAIL_CIRCUIT_OPEN for open_ms, doubled with each trip in a row up
 * to max_open_ms. Then half-open: probe_requests calls pass; when all of
 * them succeed it closes (and the open time is back to open_ms), when one
 * fails it opens again for longer.
 *
 * The state is process-wide: one gw_breaker_t per backend, shared by all
 * worker threads, guarded by a mutex held for a few instructions (never
 * across I/O; state changes are logged after it is released). It is
 * reference counted and outlives a configuration when a reload keeps it
 * (gw_breaker_inherit()).
 *
 * Accepted approximation: done() carries no ticket, so while half-open the
 * outcome of a call admitted before the circuit opened (finishing late) is
 * taken as a probe's outcome when a probe is outstanding. Its result says as
 * much about the backend as a probe's would.
 */
#ifndef GW_BREAKER_H
#define GW_BREAKER_H

#include "gw_core.h"

typedef enum { GW_BREAKER_CLOSED = 0, GW_BREAKER_OPEN, GW_BREAKER_HALF_OPEN } gw_breaker_state_t;

/* For metrics and status pages: a consistent snapshot. */
typedef struct {
    gw_breaker_state_t state;
    uint64_t trips;       /* times it opened (from closed or from half-open) */
    unsigned consecutive; /* failures in a row while closed */
    int retry_after_ms;   /* while open: until half-open; else 0 */
} gw_breaker_stats_t;

/* A new breaker (one reference) for backend name (copied) with the
 * settings conf (copied). */
gw_breaker_t *gw_breaker_new(const char *name, const gw_breaker_conf_t *conf);
gw_breaker_t *gw_breaker_ref(gw_breaker_t *br);
/* Drops a reference; frees the breaker with the last. NULL is ignored. */
void gw_breaker_unref(gw_breaker_t *br);

/* Whether a call to b may be sent now. GW_OK: yes (always for a backend
 * without a breaker), and the caller reports its outcome with
 * gw_breaker_done() or gw_breaker_abandon(); GW_AGAIN: the circuit is open
 * (or half-open and its probes are taken): fail the call with code
 * GW_FAIL_CIRCUIT_OPEN; *retry_after_ms (may be NULL) says when it may close. */
int gw_breaker_admit(const gw_backend_t *b, int *retry_after_ms);
/* The outcome of an admitted call: ok false for connect failure, reset,
 * timeout, truncated or bad response, and statuses >= 500. */
void gw_breaker_done(const gw_backend_t *b, bool ok);
/* An admitted call was cancelled (deadline, client gone, hedge loser, or it
 * never reached the backend): a half-open probe slot is given back. */
void gw_breaker_abandon(const gw_backend_t *b);
/* Milliseconds until b's circuit may let calls through again (0: closed, or
 * no breaker); at least 1 while open or half-open with its probes taken. */
int gw_breaker_retry_after(const gw_backend_t *b);
/* Seconds for a Retry-After header of an answer failed with circuit_open
 * (rounded up, at least 1). */
int gw_breaker_retry_after_s(const gw_backend_t *b);
/* b's breaker state; false (and *out zeroed) when b has none. */
bool gw_breaker_stats(const gw_backend_t *b, gw_breaker_stats_t *out);
const char *gw_breaker_state_name(gw_breaker_state_t s);

/* Whether two breaker settings are the same (a reload keeps the state). */
bool gw_breaker_conf_equal(const gw_breaker_conf_t *a, const gw_breaker_conf_t *b);

/*
 * At a reload, on the main thread, before newc is published: every backend
 * of newc with a breaker whose same-named backend in oldc has one with the
 * same settings shares that one (so a reload neither closes an open circuit
 * nor forgets recent failures). Others keep their fresh state.
 */
void gw_breaker_inherit(gw_config_t *newc, const gw_config_t *oldc);

#endif
