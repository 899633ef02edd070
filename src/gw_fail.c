/*
 * gw_fail.c - the table of failure codes (see gw_fail.h): every fact about
 * a code is one row here, so the answer, the breaker, retries, metrics and
 * logs cannot disagree about it.
 */
#include "gw_fail.h"

typedef struct {
    const char *name;       /* aggregate calls, logs */
    const char *proxy_name; /* a proxy route's error answer; NULL: name */
    short status;           /* the client's status for a required call */
    signed char retry_after; /* Retry-After: 0 none, > 0 seconds, -1 the breaker's */
    bool retried;           /* a try that failed so may be retried */
    gw_health_t health;
    gw_outcome_t outcome;
} fail_info_t;

static const fail_info_t table[GW_FAIL_MAX] = {
    [GW_FAIL_NONE] = { "", NULL, 200, 0, false, GW_HEALTH_CLEAN, GW_OUT_OK },
    [GW_FAIL_TIMEOUT] = { "timeout", "upstream_timeout", 504, 0, true, GW_HEALTH_FAULT, GW_OUT_TIMEOUT },
    [GW_FAIL_UNAVAILABLE] = { "unavailable", "upstream_unavailable", 503, 0, false, GW_HEALTH_LOCAL,
                              GW_OUT_UNAVAILABLE },
    [GW_FAIL_QUEUE_FULL] = { "queue_full", NULL, 503, 1, false, GW_HEALTH_LOCAL, GW_OUT_QUEUE_FULL },
    [GW_FAIL_QUEUE_TIMEOUT] = { "queue_timeout", NULL, 503, 1, false, GW_HEALTH_LOCAL, GW_OUT_QUEUE_TIMEOUT },
    [GW_FAIL_CIRCUIT_OPEN] = { "circuit_open", NULL, 503, -1, false, GW_HEALTH_LOCAL, GW_OUT_CIRCUIT_OPEN },
    [GW_FAIL_CONNECT_FAILED] = { "connect_failed", "upstream_connect_failed", 502, 0, true, GW_HEALTH_FAULT,
                                 GW_OUT_CONNECT },
    [GW_FAIL_RESOLVE_FAILED] = { "resolve_failed", "upstream_resolve_failed", 502, 0, false, GW_HEALTH_FAULT,
                                 GW_OUT_CONNECT },
    [GW_FAIL_TLS_FAILED] = { "tls_failed", "upstream_tls_failed", 502, 0, false, GW_HEALTH_FAULT, GW_OUT_CONNECT },
    [GW_FAIL_RESET] = { "reset", "upstream_reset", 502, 0, true, GW_HEALTH_FAULT, GW_OUT_RESET },
    [GW_FAIL_BAD_STATUS] = { "bad_status", NULL, 502, 0, true, GW_HEALTH_STATUS, GW_OUT_BAD_STATUS },
    [GW_FAIL_BAD_JSON] = { "bad_json", NULL, 502, 0, false, GW_HEALTH_FAULT, GW_OUT_INVALID },
    /* an oversized answer is a limit of ours, not a fault of the backend */
    [GW_FAIL_TOO_LARGE] = { "too_large", NULL, 502, 0, false, GW_HEALTH_CLEAN, GW_OUT_INVALID },
    /* limits of ours, not faults of the backend: its answer was fine */
    [GW_FAIL_MEMORY_BUDGET] = { "memory_budget", NULL, 503, 1, false, GW_HEALTH_CLEAN, GW_OUT_INVALID },
    [GW_FAIL_POOL_FULL] = { "queue_full", NULL, 503, 1, false, GW_HEALTH_CLEAN, GW_OUT_QUEUE_FULL },
    [GW_FAIL_TRUNCATED] = { "truncated", "upstream_truncated", 502, 0, true, GW_HEALTH_FAULT, GW_OUT_RESET },
    [GW_FAIL_BAD_RESPONSE] = { "bad_response", "upstream_bad_response", 502, 0, false, GW_HEALTH_FAULT,
                               GW_OUT_RESET },
    [GW_FAIL_MISSING_TARGET] = { "missing_target", NULL, 502, 0, false, GW_HEALTH_CLEAN, GW_OUT_INVALID },
    /* the five below never start an exchange: no metrics, no breaker */
    [GW_FAIL_MISSING_VALUE] = { "missing_value", NULL, 502, 0, false, GW_HEALTH_LOCAL, GW_OUT_CANCELLED },
    [GW_FAIL_INVALID_VALUE] = { "invalid_value", NULL, 502, 0, false, GW_HEALTH_LOCAL, GW_OUT_CANCELLED },
    [GW_FAIL_DEPENDENCY_FAILED] = { "dependency_failed", NULL, 502, 0, false, GW_HEALTH_LOCAL, GW_OUT_CANCELLED },
    [GW_FAIL_TOO_MANY_ITEMS] = { "too_many_items", NULL, 502, 0, false, GW_HEALTH_LOCAL, GW_OUT_CANCELLED },
    /* an element of a batch call, judged after its chunk's exchange was counted */
    [GW_FAIL_NOT_FOUND] = { "not_found", NULL, 502, 0, false, GW_HEALTH_LOCAL, GW_OUT_CANCELLED },
    /* every server unhealthy or ejected: refused here, as an open circuit
     * is; counted as "unavailable" (no server to send it to) */
    [GW_FAIL_NO_HEALTHY_SERVER] = { "no_healthy_server", NULL, 503, 1, false, GW_HEALTH_LOCAL, GW_OUT_UNAVAILABLE },
    [GW_FAIL_CANCELLED] = { "cancelled", NULL, 502, 0, false, GW_HEALTH_LOCAL, GW_OUT_CANCELLED },
};

static const fail_info_t *
info(gw_fail_t f)
{
    return &table[(unsigned)f < GW_FAIL_MAX ? f : GW_FAIL_CANCELLED];
}

const char *
gw_fail_name(gw_fail_t f)
{
    return info(f)->name;
}

const char *
gw_fail_proxy_name(gw_fail_t f)
{
    const fail_info_t *i = info(f);
    return i->proxy_name ? i->proxy_name : i->name;
}

int
gw_fail_status(gw_fail_t f)
{
    return info(f)->status;
}

int
gw_fail_retry_after(gw_fail_t f)
{
    return info(f)->retry_after;
}

bool
gw_fail_backend_ok(gw_fail_t f, int status)
{
    switch (info(f)->health) {
    case GW_HEALTH_CLEAN:
        return true;
    case GW_HEALTH_STATUS:
        return status < 500;
    case GW_HEALTH_LOCAL:
        /* reported only when the try was sent: a resend that found no
         * connection after the first one died counts as that death */
    case GW_HEALTH_FAULT:
        break;
    }
    return false;
}

bool
gw_fail_local(gw_fail_t f)
{
    return info(f)->health == GW_HEALTH_LOCAL;
}

bool
gw_fail_retried(gw_fail_t f)
{
    return info(f)->retried;
}

gw_outcome_t
gw_fail_outcome(gw_fail_t f)
{
    return info(f)->outcome;
}
