/*
 * gw_metrics.h - the counters behind /metrics and /status (gw_admin.c).
 *
 * No locks on the request path: every worker owns one gw_mworker_t and is
 * the only thread that writes it. A counter is bumped with a relaxed atomic
 * store of its old value plus one (a plain add on x86-64: no lock prefix),
 * so the admin thread, which sums every worker's copy at scrape time, reads
 * whole values without tearing. Gauges (connections open, calls queued) are
 * kept as per-worker deltas whose sum is the gauge: a pool replaced by a
 * reload and its successor update the same slot.
 *
 * Routes and backends are counted under their name (a route's pattern, a
 * backend's name), not under their configuration object: a reload keeps
 * the counters of what it keeps. gw_metrics_bind() gives each route and
 * backend of a configuration its slot (main thread, before the
 * configuration is published); names are never forgotten, and slots are
 * fixed in number (GW_M_ROUTES, GW_M_BACKENDS) so no array ever moves under
 * a reader. Names past the limit share the "(other)" slot, with a warning.
 *
 * A backend's servers (gw_peer_t) get slots the same way, under their
 * backend's name and their label ("10.0.0.2:8080"), for the per-server
 * connection gauges: a pool kept by a reload, or replaced and draining
 * beside its successor, updates the same slot. Their other figures
 * (requests, failures, health, ejection) live in the server's shared state
 * (gw_cluster.h), which is not per worker.
 */
#ifndef GW_METRICS_H
#define GW_METRICS_H

#include "gw_core.h"
#include "gw_fail.h"

struct evbuffer;

/* Route slots: 0 for requests no route matched, 1 for names past the limit. */
#define GW_M_ROUTES 512
#define GW_M_ROUTE_UNMATCHED 0
#define GW_M_ROUTE_OTHER 1
/* Backend slots: 0 for names past the limit. */
#define GW_M_BACKENDS 256
#define GW_M_BACKEND_OTHER 0
/* Server slots: 0 for (backend, server) pairs past the limit; its figures
 * are not rendered (they would mix servers). */
#define GW_M_SERVERS 4096
#define GW_M_SERVER_OTHER 0

/* Latency histogram upper bounds, in microseconds (plus +Inf). */
#define GW_M_NBOUNDS 14
extern const uint64_t gw_m_bounds_us[GW_M_NBOUNDS];

typedef struct {
    uint64_t n[GW_M_NBOUNDS + 1]; /* per bucket, not cumulative; the last is +Inf */
    uint64_t sum_us;
} gw_hist_t;


extern const char *const gw_outcome_names[GW_OUT_MAX];

typedef struct {
    uint64_t status[6]; /* 1xx, 2xx, 3xx, 4xx, 5xx, other */
    uint64_t rate_limited;
    gw_hist_t latency;
} gw_mroute_t;

typedef struct {
    uint64_t outcome[GW_OUT_MAX];
    gw_hist_t latency;
    uint64_t retries, hedges;
    uint64_t opened;         /* upstream connections opened */
    uint64_t queue_rejected; /* calls refused because the queue was full */
    int64_t active, idle, queued; /* deltas: the sum over workers is the gauge */
} gw_mbackend_t;

/* One server's connections of one worker: deltas, as gw_mbackend_t's. */
typedef struct {
    int64_t open; /* connecting, in use or idle */
    int64_t idle; /* pooled */
} gw_mserver_t;

typedef struct {
    uint64_t accepted;     /* client connections */
    uint64_t shed;         /* requests refused by max_inflight */
    int64_t inflight;      /* delta: requests begun (a first byte read) and not ended */
    gw_mroute_t routes[GW_M_ROUTES];
    gw_mbackend_t backends[GW_M_BACKENDS];
    gw_mserver_t servers[GW_M_SERVERS];
    gw_hist_t loop_stall;        /* how late the worker's probe timer fired, as far as the
                                  * thread ran meanwhile (gw_server.c) */
    uint64_t loop_stall_max_us;  /* the longest of those */
    uint64_t loop_lag_max_us;    /* the latest the probe fired, waits for a CPU included */
} gw_mworker_t;

/* Allocates the counters of nworkers workers (zeroed). Main thread, once,
 * before any worker runs. */
void gw_metrics_init(int nworkers);
/* Worker id's counters. */
gw_mworker_t *gw_metrics_worker(int id);
/* Frees them, after every worker stopped. */
void gw_metrics_free(void);

/* Gives every route, backend and server of cfg its slot (route->mid,
 * backend->mid, server->mid). Main thread, before cfg is published to the
 * workers. */
void gw_metrics_bind(gw_config_t *cfg);

/* The main thread's events. */
void gw_metrics_reloaded(bool ok);

/* Bumps a counter owned by the calling worker. */
static inline void
gw_m_add(uint64_t *c, uint64_t v)
{
    __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}

static inline void
gw_m_gauge(int64_t *g, int64_t delta)
{
    __atomic_store_n(g, __atomic_load_n(g, __ATOMIC_RELAXED) + delta, __ATOMIC_RELAXED);
}

void gw_m_observe(gw_hist_t *h, uint64_t us);

/* A request answered with status after us microseconds (route slot mid). */
void gw_m_request(gw_mworker_t *m, unsigned mid, int status, uint64_t us);
/* A backend call ended with code (GW_FAIL_NONE: success) after us microseconds. */
void gw_m_call(gw_mworker_t *m, unsigned mid, gw_fail_t code, uint64_t us);

/* A sum over every worker, for the admin thread. */
typedef struct {
    uint64_t count, sum_us, errors; /* requests (or calls); errors: 5xx answers (or failed calls) */
} gw_m_recent_t;
void gw_metrics_route_sum(unsigned mid, gw_mroute_t *out);
void gw_metrics_backend_sum(unsigned mid, gw_mbackend_t *out);
/* A server slot's connections summed over the workers (never negative). */
void gw_metrics_server_sum(unsigned mid, gw_mserver_t *out);

/* Registered names, for the admin thread: the number of slots in use and
 * the name of one (never changes once set). */
unsigned gw_metrics_nroutes(void);
const char *gw_metrics_route_name(unsigned mid);
unsigned gw_metrics_nbackends(void);
const char *gw_metrics_backend_name(unsigned mid);

/* Process-wide numbers. */
typedef struct {
    uint64_t reloads_ok, reloads_failed;
    int64_t last_reload;  /* unix time of the last reload attempt; 0: none */
    bool last_reload_ok;
    uint64_t accepted, shed;
} gw_m_process_t;
void gw_metrics_process(gw_m_process_t *out);

/* Appends the Prometheus text exposition of the counters to out (the
 * caller adds what lives elsewhere: breakers, in-flight, build info). */
void gw_metrics_render(struct evbuffer *out);
/* Appends key="value" to out, value escaped as the text format wants
 * (backslash, double quote, newline): every label value that comes from
 * the configuration goes through it. */
void gw_metrics_label(struct evbuffer *out, const char *key, const char *value);
/* Appends one histogram in exposition format, name with its labels
 * (e.g. "route=\"/x\"") and le added. */
void gw_metrics_render_hist(struct evbuffer *out, const char *name, const char *labels, const gw_hist_t *h);

#endif
