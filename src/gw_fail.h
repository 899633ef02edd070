/*
 * gw_fail.h - the closed set of ways a backend call can fail, and what
 * each one means for the client, the backend's health, retries and the
 * metrics (as nginx's NGX_HTTP_* codes: one enum, one name table).
 *
 * Aggregate calls, proxy routes, the breaker, the metrics and the logs all
 * carry a gw_fail_t and ask this table; a code's text exists only at the
 * edges (error answers, "_errors", Server-Timing, log lines). The names
 * are wire names: clients and the README rely on them.
 */
#ifndef GW_FAIL_H
#define GW_FAIL_H

#include "gw_core.h"

typedef enum {
    GW_FAIL_NONE = 0,          /* success */
    GW_FAIL_TIMEOUT,           /* the call's timeout_ms, connect_timeout_ms, the route's deadline_ms */
    GW_FAIL_UNAVAILABLE,       /* max_connections reached, no queue */
    GW_FAIL_QUEUE_FULL,        /* max_pending calls already wait */
    GW_FAIL_QUEUE_TIMEOUT,     /* no connection within queue_timeout_ms */
    GW_FAIL_CIRCUIT_OPEN,      /* the breaker refused the call: not sent */
    GW_FAIL_CONNECT_FAILED,    /* refused or failed (aggregate calls: also TLS and name resolution) */
    GW_FAIL_RESOLVE_FAILED,    /* proxy routes: the backend's name has no address */
    GW_FAIL_TLS_FAILED,        /* proxy routes: the TLS handshake or verification failed */
    GW_FAIL_RESET,             /* proxy routes: closed or reset before a response byte */
    GW_FAIL_BAD_STATUS,        /* aggregate calls: not 2xx; proxy routes: 5xx (passed on, not an error answer) */
    GW_FAIL_BAD_JSON,          /* a 2xx body that is not JSON */
    GW_FAIL_TOO_LARGE,         /* the body is over max_response_bytes */
    GW_FAIL_MEMORY_BUDGET,     /* the body, or its parsed tree, does not fit in memory.response_body_bytes */
    GW_FAIL_POOL_FULL,         /* thread_pool.max_queue answers wait to be parsed ("queue_full" on the wire) */
    GW_FAIL_TRUNCATED,         /* closed or reset before the whole response */
    GW_FAIL_BAD_RESPONSE,      /* not valid HTTP */
    GW_FAIL_MISSING_TARGET,    /* the answer has nothing at target */
    GW_FAIL_MISSING_VALUE,     /* a template value is absent or null; a foreach array is absent */
    GW_FAIL_INVALID_VALUE,     /* a template value cannot be used; a foreach value is not an array */
    GW_FAIL_DEPENDENCY_FAILED, /* a call it depends on failed */
    GW_FAIL_TOO_MANY_ITEMS,    /* a foreach array is longer than foreach_max */
    GW_FAIL_NOT_FOUND,         /* a batch call's answer has no element matching an element's value */
    GW_FAIL_NO_HEALTHY_SERVER, /* no server of the backend is usable (unhealthy or ejected): not sent */
    GW_FAIL_CANCELLED, /* the request ended first (deadline, client gone, a required call failed): metrics only */
    GW_FAIL_MAX
} gw_fail_t;

/* How a backend call (an aggregate call's exchange, or a proxied request)
 * ended, as /metrics counts it (the label values are gw_outcome_names[] in
 * gw_metrics.c). */
typedef enum {
    GW_OUT_OK = 0,      /* an answer: 2xx for an aggregate call, below 500 for a proxied request */
    GW_OUT_BAD_STATUS,  /* any other status */
    GW_OUT_TIMEOUT,
    GW_OUT_CONNECT,     /* connect, TLS or name resolution failed */
    GW_OUT_RESET,       /* reset, truncated, or an unparsable response */
    GW_OUT_INVALID,     /* an answer that is not the JSON the call needs, or too large */
    GW_OUT_CIRCUIT_OPEN,
    GW_OUT_QUEUE_FULL,
    GW_OUT_QUEUE_TIMEOUT,
    GW_OUT_UNAVAILABLE, /* max_connections reached with no queue */
    GW_OUT_CANCELLED,   /* the request ended (deadline, client gone, required call failed) first */
    GW_OUT_MAX
} gw_outcome_t;

/* What a failure says about the backend's health (circuit breaker). */
typedef enum {
    GW_HEALTH_FAULT = 0, /* a failure of the backend */
    GW_HEALTH_STATUS,    /* a failure when the status is 500 or more (4xx: the backend works) */
    GW_HEALTH_CLEAN,     /* the backend answered well; the call did not like the answer */
    GW_HEALTH_LOCAL      /* decided here, before or without the backend: not reported unless the try was sent */
} gw_health_t;

/* The name of a code as aggregate calls report it (error answers, _errors,
 * Server-Timing, access log): "timeout", "bad_json"; "" for GW_FAIL_NONE.
 * Static. */
const char *gw_fail_name(gw_fail_t f);
/* The name of a code in a proxy route's error answer: "upstream_timeout",
 * "circuit_open". Static. */
const char *gw_fail_proxy_name(gw_fail_t f);
/* The client's status when a required call (or a proxied request before
 * its response head) fails with f: 502, 503 or 504. */
int gw_fail_status(gw_fail_t f);
/* Retry-After of that answer: 0 none, > 0 seconds, -1 the breaker's
 * (gw_breaker_retry_after_s). */
int gw_fail_retry_after(gw_fail_t f);
/* Whether a sent try that ended with f (and the backend's status, 0 when
 * none) was a success for the backend's health. */
bool gw_fail_backend_ok(gw_fail_t f, int status);
/* Whether f was decided here, before or without the backend (queue, circuit,
 * no usable server, cancelled): it says nothing about a server's health. */
bool gw_fail_local(gw_fail_t f);
/* Whether a try that failed with f may be retried as far as the failure
 * goes (bad_status: when its status is listed, the caller checks). */
bool gw_fail_retried(gw_fail_t f);
/* The metrics bucket of f. */
gw_outcome_t gw_fail_outcome(gw_fail_t f);

#endif
