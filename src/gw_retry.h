/*
 * gw_retry.h - the retry policy of a backend ("backends.NAME.retry") and
 * its retry budget, shared by aggregate calls (retries and hedges) and
 * proxy routes (retries).
 *
 * Configuration: gw_retry_conf_t is part of the immutable configuration
 * (every backend has one; "retry" absent leaves attempts at 1: no retries
 * beyond the one-time resend of a request whose pooled connection turned
 * out stale, which gw_agg and gw_proxy do on their own). The mutable part,
 * the budget's counters, lives in a separate reference-counted
 * gw_retry_state_t that the configuration points to and that a reload may
 * hand on to the next configuration (gw_retry_inherit()).
 *
 * Budget: retries (and hedges) in flight to a backend may be at most
 * max(min_retries, budget_percent % of the requests in flight to it), over
 * all workers of the process. Requests are counted with
 * gw_retry_request_begin/end(), retries with gw_retry_acquire/release().
 * Counters are atomics: no lock, nothing held across I/O.
 *
 * Backoff: full jitter, sleep = random(0, min(cap, base * 2^retry)), from a
 * per-thread xorshift generator (each worker thread seeds its own).
 */
#ifndef GW_RETRY_H
#define GW_RETRY_H

#include "gw_core.h"

#define GW_RETRY_MAX_ATTEMPTS 10
#define GW_RETRY_MAX_STATUSES 16

typedef struct gw_retry_state_s gw_retry_state_t;

/* A backend's "retry" section. Immutable once loaded, except state, which
 * only gw_retry_inherit() replaces (before the configuration is published). */
typedef struct gw_retry_conf_s {
    bool enabled;                        /* "retry" was given */
    unsigned attempts;                   /* tries of one request, the first included (1..10; 1 when absent) */
    int backoff_base_ms;                 /* 0..60000, default 25 */
    int backoff_cap_ms;                  /* base..60000, default 250 */
    int per_try_timeout_ms;              /* 0: none (the call's timeout only) */
    int statuses[GW_RETRY_MAX_STATUSES]; /* answers retried (default 502, 503, 504) */
    unsigned nstatuses;
    bool retry_non_idempotent; /* also POST and PATCH */
    unsigned budget_percent;   /* 0..100, default 20 */
    unsigned min_retries;      /* 0..100000, default 3 */
    bool counted;              /* requests are counted for the budget: retries enabled or a call hedges */
    gw_retry_state_t *state;   /* one reference; never NULL after gw_retry_conf_new() */
} gw_retry_conf_t;

/* A configuration with the defaults (attempts 1) and a new state. Freed
 * with gw_retry_conf_free(), which drops the state's reference. */
gw_retry_conf_t *gw_retry_conf_new(void);
void gw_retry_conf_free(gw_retry_conf_t *rc);

/* Whether two configurations retry alike (the state is not compared). */
bool gw_retry_conf_same(const gw_retry_conf_t *a, const gw_retry_conf_t *b);

/* Whether status is one of the configured statuses. */
bool gw_retry_status(const gw_retry_conf_t *rc, int status);

/* Whether a request with this llhttp method may be retried (or hedged). */
bool gw_retry_method_ok(const gw_retry_conf_t *rc, int method);

/* The sleep before retry number n (1 for the first retry), in ms: full
 * jitter over [0, min(cap, base * 2^(n-1))]. */
int gw_retry_backoff_ms(const gw_retry_conf_t *rc, unsigned n);

/* A uniformly distributed number in [0, bound] from the calling thread's
 * generator. */
uint64_t gw_retry_random(uint64_t bound);

/* A request (an aggregate exchange or a proxied request) to the backend
 * began or ended. */
void gw_retry_request_begin(const gw_retry_conf_t *rc);
void gw_retry_request_end(const gw_retry_conf_t *rc);

/* Takes a slot for one retry or hedge when the budget allows: true, and
 * the caller calls gw_retry_release() when that attempt ends; false when
 * denied (counted; the caller logs). */
bool gw_retry_acquire(const gw_retry_conf_t *rc);
void gw_retry_release(const gw_retry_conf_t *rc);

/* Counters for metrics and tests. */
typedef struct {
    long requests;                      /* in flight now */
    long retries;                       /* in flight now */
    unsigned long long granted, denied; /* since the state was created */
} gw_retry_stats_t;
void gw_retry_stats(const gw_retry_conf_t *rc, gw_retry_stats_t *out);

/*
 * At a reload, on the main thread before newc is published: every backend
 * of newc whose retry settings equal those of the same-named backend of
 * oldc shares that backend's state (its counters go on), instead of the
 * fresh one it was loaded with.
 */
void gw_retry_inherit(gw_config_t *newc, const gw_config_t *oldc);

#endif
