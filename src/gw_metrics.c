/*
 * gw_metrics.c - per-worker counters, their names, and their Prometheus
 * text rendering (see gw_metrics.h for the locking rule: there is none on
 * the request path).
 */
#include "gw_metrics.h"

#include "gw_budget.h"
#include "gw_config.h"
#include "gw_log.h"
#include "gw_tpool.h"

#include <event2/buffer.h>
#include <string.h>
#include <time.h>

const uint64_t gw_m_bounds_us[GW_M_NBOUNDS] = { 1000,   2500,   5000,    10000,   25000,   50000,   100000,
                                                250000, 500000, 1000000, 2500000, 5000000, 10000000, 30000000 };

const char *const gw_outcome_names[GW_OUT_MAX] = { "ok",           "bad_status", "timeout",    "connect_failed",
                                                   "reset",        "invalid",    "circuit_open", "queue_full",
                                                   "queue_timeout", "unavailable", "cancelled" };

static gw_mworker_t *workers; /* [nworkers] */
static int nworkers;

/* Slot names: written by the main thread before the count that covers them
 * is published (release), read by the admin thread after an acquire. */
static char *route_names[GW_M_ROUTES];
static unsigned nroute_names; /* atomic */
static char *backend_names[GW_M_BACKENDS];
static unsigned nbackend_names; /* atomic */
/* Server slots: (backend name, server label) pairs, the same way. */
static char *server_backends[GW_M_SERVERS], *server_labels[GW_M_SERVERS];
static unsigned nserver_names; /* atomic */
/* A name went to the "(other)" slot: it is rendered from then on. */
static bool routes_overflowed, backends_overflowed; /* atomic */

/* Main thread writes, the admin thread reads. */
static uint64_t reloads_ok, reloads_failed; /* atomic */
static int64_t last_reload;                 /* atomic */
static bool last_reload_ok;                 /* atomic */

void
gw_metrics_init(int n)
{
    workers = gw_calloc((size_t)n, sizeof(gw_mworker_t));
    nworkers = n;
    if (nroute_names == 0) {
        route_names[GW_M_ROUTE_UNMATCHED] = gw_strdup("(unmatched)");
        route_names[GW_M_ROUTE_OTHER] = gw_strdup("(other)");
        backend_names[GW_M_BACKEND_OTHER] = gw_strdup("(other)");
        server_backends[GW_M_SERVER_OTHER] = gw_strdup("(other)");
        server_labels[GW_M_SERVER_OTHER] = gw_strdup("(other)");
        __atomic_store_n(&nroute_names, 2, __ATOMIC_RELEASE);
        __atomic_store_n(&nbackend_names, 1, __ATOMIC_RELEASE);
        __atomic_store_n(&nserver_names, 1, __ATOMIC_RELEASE);
    }
}

gw_mworker_t *
gw_metrics_worker(int id)
{
    return &workers[id];
}

void
gw_metrics_free(void)
{
    free(workers);
    workers = NULL;
    nworkers = 0;
    for (unsigned i = 0; i < nroute_names; i++)
        free(route_names[i]);
    for (unsigned i = 0; i < nbackend_names; i++)
        free(backend_names[i]);
    for (unsigned i = 0; i < nserver_names; i++) {
        free(server_backends[i]);
        free(server_labels[i]);
    }
    nroute_names = nbackend_names = nserver_names = 0;
}

/* The slot of name in names[*n] (added when new); overflow when full. */
static unsigned
slot_of(char **names, unsigned *n, unsigned cap, const char *name, unsigned overflow, bool *overflowed,
        const char *what)
{
    unsigned count = *n;
    for (unsigned i = 0; i < count; i++)
        if (strcmp(names[i], name) == 0)
            return i;
    if (count == cap) {
        gw_log(GW_LOG_WARN, "metrics: more than %u %s names: %s \"%s\" is counted as \"(other)\"", cap, what, what,
               name);
        __atomic_store_n(overflowed, true, __ATOMIC_RELAXED);
        return overflow;
    }
    names[count] = gw_strdup(name);
    __atomic_store_n(n, count + 1, __ATOMIC_RELEASE);
    return count;
}

/* The slot of server label of backend (added when new); GW_M_SERVER_OTHER
 * when full. Linear, as slot_of: once per server per load or reload. */
static unsigned
server_slot(const char *backend, const char *label)
{
    unsigned count = nserver_names;
    for (unsigned i = 1; i < count; i++)
        if (strcmp(server_labels[i], label) == 0 && strcmp(server_backends[i], backend) == 0)
            return i;
    if (count == GW_M_SERVERS) {
        gw_log(GW_LOG_WARN, "metrics: more than %u backend servers: the connections of backend %s server %s are "
               "not counted per server", GW_M_SERVERS - 1, backend, label);
        return GW_M_SERVER_OTHER;
    }
    server_backends[count] = gw_strdup(backend);
    server_labels[count] = gw_strdup(label);
    __atomic_store_n(&nserver_names, count + 1, __ATOMIC_RELEASE);
    return count;
}

void
gw_metrics_bind(gw_config_t *cfg)
{
    for (size_t i = 0; i < cfg->nroutes; i++)
        cfg->routes[i]->mid = slot_of(route_names, &nroute_names, GW_M_ROUTES, cfg->routes[i]->pattern,
                                      GW_M_ROUTE_OTHER, &routes_overflowed, "route");
    for (size_t i = 0; i < cfg->nbackends; i++)
        cfg->backends[i]->mid = slot_of(backend_names, &nbackend_names, GW_M_BACKENDS, cfg->backends[i]->name,
                                        GW_M_BACKEND_OTHER, &backends_overflowed, "backend");
    for (size_t i = 0; i < cfg->nbackends; i++) {
        gw_backend_t *b = cfg->backends[i];
        for (size_t k = 0; k < b->nservers; k++)
            b->servers[k].mid = server_slot(b->name, b->servers[k].label);
    }
}

void
gw_metrics_reloaded(bool ok)
{
    if (ok)
        __atomic_add_fetch(&reloads_ok, 1, __ATOMIC_RELAXED);
    else
        __atomic_add_fetch(&reloads_failed, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&last_reload, (int64_t)time(NULL), __ATOMIC_RELAXED);
    __atomic_store_n(&last_reload_ok, ok, __ATOMIC_RELAXED);
}

void
gw_m_observe(gw_hist_t *h, uint64_t us)
{
    unsigned b = 0;
    while (b < GW_M_NBOUNDS && us > gw_m_bounds_us[b])
        b++;
    gw_m_add(&h->n[b], 1);
    gw_m_add(&h->sum_us, us);
}

void
gw_m_request(gw_mworker_t *m, unsigned mid, int status, uint64_t us)
{
    gw_mroute_t *r = &m->routes[mid];
    int cls = status >= 100 && status < 600 ? status / 100 - 1 : 5;
    gw_m_add(&r->status[cls], 1);
    gw_m_observe(&r->latency, us);
}

void
gw_m_call(gw_mworker_t *m, unsigned mid, gw_fail_t code, uint64_t us)
{
    gw_mbackend_t *b = &m->backends[mid];
    gw_outcome_t o = gw_fail_outcome(code);
    gw_m_add(&b->outcome[o], 1);
    if (o != GW_OUT_CANCELLED && o != GW_OUT_CIRCUIT_OPEN && o != GW_OUT_QUEUE_FULL)
        gw_m_observe(&b->latency, us); /* calls that reached the backend, or waited for it */
}

/* --- sums, for the admin thread ------------------------------------------- */

static uint64_t
ld(const uint64_t *c)
{
    return __atomic_load_n(c, __ATOMIC_RELAXED);
}

static void
hist_sum(gw_hist_t *out, const gw_hist_t *h)
{
    for (unsigned b = 0; b <= GW_M_NBOUNDS; b++)
        out->n[b] += ld(&h->n[b]);
    out->sum_us += ld(&h->sum_us);
}

void
gw_metrics_route_sum(unsigned mid, gw_mroute_t *out)
{
    memset(out, 0, sizeof(*out));
    for (int w = 0; w < nworkers; w++) {
        const gw_mroute_t *r = &workers[w].routes[mid];
        for (unsigned k = 0; k < GW_NELEM(r->status); k++)
            out->status[k] += ld(&r->status[k]);
        out->rate_limited += ld(&r->rate_limited);
        hist_sum(&out->latency, &r->latency);
    }
}

void
gw_metrics_backend_sum(unsigned mid, gw_mbackend_t *out)
{
    memset(out, 0, sizeof(*out));
    for (int w = 0; w < nworkers; w++) {
        const gw_mbackend_t *b = &workers[w].backends[mid];
        for (unsigned k = 0; k < GW_OUT_MAX; k++)
            out->outcome[k] += ld(&b->outcome[k]);
        hist_sum(&out->latency, &b->latency);
        out->retries += ld(&b->retries);
        out->hedges += ld(&b->hedges);
        out->opened += ld(&b->opened);
        out->queue_rejected += ld(&b->queue_rejected);
        out->active += __atomic_load_n(&b->active, __ATOMIC_RELAXED);
        out->idle += __atomic_load_n(&b->idle, __ATOMIC_RELAXED);
        out->queued += __atomic_load_n(&b->queued, __ATOMIC_RELAXED);
    }
}

void
gw_metrics_server_sum(unsigned mid, gw_mserver_t *out)
{
    memset(out, 0, sizeof(*out));
    for (int w = 0; w < nworkers; w++) {
        const gw_mserver_t *s = &workers[w].servers[mid];
        out->open += __atomic_load_n(&s->open, __ATOMIC_RELAXED);
        out->idle += __atomic_load_n(&s->idle, __ATOMIC_RELAXED);
    }
    /* a worker moves a connection between the two while they are read one
     * after the other: keep the pair consistent */
    if (out->open < 0)
        out->open = 0;
    if (out->idle < 0)
        out->idle = 0;
    if (out->idle > out->open)
        out->idle = out->open;
}

unsigned
gw_metrics_nroutes(void)
{
    return __atomic_load_n(&nroute_names, __ATOMIC_ACQUIRE);
}

const char *
gw_metrics_route_name(unsigned mid)
{
    return route_names[mid];
}

unsigned
gw_metrics_nbackends(void)
{
    return __atomic_load_n(&nbackend_names, __ATOMIC_ACQUIRE);
}

const char *
gw_metrics_backend_name(unsigned mid)
{
    return backend_names[mid];
}

void
gw_metrics_process(gw_m_process_t *out)
{
    memset(out, 0, sizeof(*out));
    out->reloads_ok = __atomic_load_n(&reloads_ok, __ATOMIC_RELAXED);
    out->reloads_failed = __atomic_load_n(&reloads_failed, __ATOMIC_RELAXED);
    out->last_reload = __atomic_load_n(&last_reload, __ATOMIC_RELAXED);
    out->last_reload_ok = __atomic_load_n(&last_reload_ok, __ATOMIC_RELAXED);
    for (int w = 0; w < nworkers; w++) {
        out->accepted += ld(&workers[w].accepted);
        out->shed += ld(&workers[w].shed);
    }
}

/* --- Prometheus text format ----------------------------------------------- */

/* A label value: backslash, double quote and newline escaped. */
static void
add_label(struct evbuffer *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            evbuffer_add_printf(out, "\\%c", *s);
        else if (*s == '\n')
            evbuffer_add(out, "\\n", 2);
        else
            evbuffer_add(out, s, 1);
    }
}

void
gw_metrics_label(struct evbuffer *out, const char *key, const char *value)
{
    evbuffer_add_printf(out, "%s=\"", key);
    add_label(out, value);
    evbuffer_add(out, "\"", 1);
}

static void
family(struct evbuffer *out, const char *name, const char *type, const char *help)
{
    evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void
gw_metrics_render_hist(struct evbuffer *out, const char *name, const char *labels, const gw_hist_t *h)
{
    uint64_t cum = 0;
    const char *comma = *labels ? "," : ""; /* "" labels: none */
    for (unsigned b = 0; b <= GW_M_NBOUNDS; b++) {
        cum += h->n[b];
        if (b < GW_M_NBOUNDS)
            evbuffer_add_printf(out, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, comma,
                                (double)gw_m_bounds_us[b] / 1e6, (unsigned long long)cum);
        else
            evbuffer_add_printf(out, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, comma, (unsigned long long)cum);
    }
    if (*labels)
        evbuffer_add_printf(out, "%s_sum{%s} %.6f\n%s_count{%s} %llu\n", name, labels, (double)h->sum_us / 1e6, name,
                            labels, (unsigned long long)cum);
    else
        evbuffer_add_printf(out, "%s_sum %.6f\n%s_count %llu\n", name, (double)h->sum_us / 1e6, name,
                            (unsigned long long)cum);
}

/* The workers' loop stalls and the thread pool (the memory budgets: gw_admin.c). */
static void
render_runtime(struct evbuffer *out)
{
    family(out, "gatherd_worker_loop_stall_seconds", "histogram",
           "Loop stalls: how late each worker's 10 ms probe timer fired, counting only the time the worker ran "
           "meanwhile (one stretch of work on its loop).");
    gw_hist_t h;
    memset(&h, 0, sizeof(h));
    for (int w = 0; w < nworkers; w++)
        hist_sum(&h, &workers[w].loop_stall);
    gw_metrics_render_hist(out, "gatherd_worker_loop_stall_seconds", "", &h);
    family(out, "gatherd_worker_loop_stall_max_seconds", "gauge", "The longest loop stall of each worker since start.");
    for (int w = 0; w < nworkers; w++)
        evbuffer_add_printf(out, "gatherd_worker_loop_stall_max_seconds{worker=\"%d\"} %.6f\n", w,
                            (double)ld(&workers[w].loop_stall_max_us) / 1e6);
    family(out, "gatherd_worker_loop_lag_max_seconds", "gauge",
           "The latest each worker's probe timer fired since start, time spent waiting for a CPU included.");
    for (int w = 0; w < nworkers; w++)
        evbuffer_add_printf(out, "gatherd_worker_loop_lag_max_seconds{worker=\"%d\"} %.6f\n", w,
                            (double)ld(&workers[w].loop_lag_max_us) / 1e6);

    gw_tpool_stats_t tp;
    gw_tpool_stats(&tp);
    family(out, "gatherd_thread_pool_threads", "gauge", "Threads of the pool that parses large answers.");
    evbuffer_add_printf(out, "gatherd_thread_pool_threads %u\n", tp.threads);
    family(out, "gatherd_thread_pool_queue_depth", "gauge", "Jobs waiting for a pool thread.");
    evbuffer_add_printf(out, "gatherd_thread_pool_queue_depth %u\n", tp.queued);
    family(out, "gatherd_thread_pool_busy", "gauge", "Pool threads running a job.");
    evbuffer_add_printf(out, "gatherd_thread_pool_busy %u\n", tp.running);
    family(out, "gatherd_thread_pool_jobs_total", "counter", "Jobs the pool ran.");
    evbuffer_add_printf(out, "gatherd_thread_pool_jobs_total %llu\n", (unsigned long long)tp.jobs);
    family(out, "gatherd_thread_pool_rejected_total", "counter",
           "Answers not parsed because thread_pool.max_queue jobs were waiting (queue_full).");
    evbuffer_add_printf(out, "gatherd_thread_pool_rejected_total %llu\n", (unsigned long long)tp.rejected);

}

/* "route=\"NAME\"" or "backend=\"NAME\"", escaped and whole (names are
 * any JSON string, of any length). Returns a new string (free). */
static char *
label_text(const char *key, const char *value)
{
    struct evbuffer *tmp = evbuffer_new();
    gw_metrics_label(tmp, key, value);
    size_t n = evbuffer_get_length(tmp);
    char *buf = gw_malloc(n + 1);
    evbuffer_remove(tmp, buf, n);
    buf[n] = '\0';
    evbuffer_free(tmp);
    return buf;
}

void
gw_metrics_render(struct evbuffer *out)
{
    static const char *const classes[] = { "1xx", "2xx", "3xx", "4xx", "5xx", "other" };
    unsigned nr = gw_metrics_nroutes(), nb = gw_metrics_nbackends();
    gw_mroute_t *rs = gw_calloc(nr ? nr : 1, sizeof(*rs));
    gw_mbackend_t *bs = gw_calloc(nb ? nb : 1, sizeof(*bs));
    char **rl = gw_calloc(nr ? nr : 1, sizeof(*rl));
    char **bl = gw_calloc(nb ? nb : 1, sizeof(*bl));
    for (unsigned i = 0; i < nr; i++) {
        gw_metrics_route_sum(i, &rs[i]);
        rl[i] = label_text("route", route_names[i]);
    }
    for (unsigned i = 0; i < nb; i++) {
        gw_metrics_backend_sum(i, &bs[i]);
        bl[i] = label_text("backend", backend_names[i]);
    }
    /* the "(other)" slots appear once a name went there */
    bool route_on[GW_M_ROUTES], backend_on[GW_M_BACKENDS];
    for (unsigned i = 0; i < nr; i++)
        route_on[i] = i != GW_M_ROUTE_OTHER || __atomic_load_n(&routes_overflowed, __ATOMIC_RELAXED);
    for (unsigned i = 0; i < nb; i++)
        backend_on[i] = i != GW_M_BACKEND_OTHER || __atomic_load_n(&backends_overflowed, __ATOMIC_RELAXED);

    family(out, "gatherd_requests_total", "counter", "Requests answered, by route pattern and status class.");
    for (unsigned i = 0; i < nr; i++)
        for (unsigned k = 0; k < GW_NELEM(classes) && route_on[i]; k++)
            if (rs[i].status[k] || (k == 1 && i > GW_M_ROUTE_OTHER))
                evbuffer_add_printf(out, "gatherd_requests_total{%s,code=\"%s\"} %llu\n", rl[i], classes[k],
                                    (unsigned long long)rs[i].status[k]);
    family(out, "gatherd_request_duration_seconds", "histogram",
           "Time from the first byte of a request to its answer, by route pattern.");
    for (unsigned i = 0; i < nr; i++)
        if (route_on[i])
            gw_metrics_render_hist(out, "gatherd_request_duration_seconds", rl[i], &rs[i].latency);
    family(out, "gatherd_rate_limited_total", "counter", "Requests refused by the route's rate limit (429).");
    for (unsigned i = GW_M_ROUTE_OTHER; i < nr; i++)
        if (route_on[i])
            evbuffer_add_printf(out, "gatherd_rate_limited_total{%s} %llu\n", rl[i], (unsigned long long)rs[i].rate_limited);

    family(out, "gatherd_backend_calls_total", "counter",
           "Backend calls (aggregate exchanges and proxied requests), by backend and outcome.");
    for (unsigned i = 0; i < nb; i++)
        for (unsigned k = 0; k < GW_OUT_MAX && backend_on[i]; k++)
            if (bs[i].outcome[k] || k == GW_OUT_OK)
                evbuffer_add_printf(out, "gatherd_backend_calls_total{%s,outcome=\"%s\"} %llu\n", bl[i],
                                    gw_outcome_names[k], (unsigned long long)bs[i].outcome[k]);
    family(out, "gatherd_backend_call_duration_seconds", "histogram",
           "Backend call time, retries and queueing included, by backend.");
    for (unsigned i = 0; i < nb; i++)
        if (backend_on[i])
            gw_metrics_render_hist(out, "gatherd_backend_call_duration_seconds", bl[i], &bs[i].latency);
    struct {
        const char *name, *type, *help;
        size_t off;
        bool gauge;
    } const per_backend[] = {
        { "gatherd_backend_retries_total", "counter", "Retries sent.", offsetof(gw_mbackend_t, retries), false },
        { "gatherd_backend_hedges_total", "counter", "Hedged copies sent.", offsetof(gw_mbackend_t, hedges), false },
        { "gatherd_upstream_connections_opened_total", "counter", "Upstream connections opened.",
          offsetof(gw_mbackend_t, opened), false },
        { "gatherd_backend_queue_rejected_total", "counter", "Calls refused because the backend's queue was full.",
          offsetof(gw_mbackend_t, queue_rejected), false },
        { "gatherd_backend_queue_depth", "gauge", "Calls waiting for an upstream connection.",
          offsetof(gw_mbackend_t, queued), true },
    };
    for (size_t f = 0; f < GW_NELEM(per_backend); f++) {
        family(out, per_backend[f].name, per_backend[f].type, per_backend[f].help);
        for (unsigned i = 0; i < nb; i++) {
            if (!backend_on[i])
                continue;
            const char *p = (const char *)&bs[i] + per_backend[f].off;
            long long v = per_backend[f].gauge ? (long long)*(const int64_t *)p : (long long)*(const uint64_t *)p;
            evbuffer_add_printf(out, "%s{%s} %lld\n", per_backend[f].name, bl[i], v);
        }
    }
    family(out, "gatherd_upstream_connections", "gauge", "Open upstream connections, by backend and state.");
    for (unsigned i = 0; i < nb; i++)
        if (backend_on[i])
            evbuffer_add_printf(out, "gatherd_upstream_connections{%s,state=\"active\"} %lld\n"
                                 "gatherd_upstream_connections{%s,state=\"idle\"} %lld\n",
                            bl[i], (long long)bs[i].active, bl[i], (long long)bs[i].idle);

    gw_m_process_t p;
    gw_metrics_process(&p);
    family(out, "gatherd_connections_accepted_total", "counter", "Client connections accepted.");
    evbuffer_add_printf(out, "gatherd_connections_accepted_total %llu\n", (unsigned long long)p.accepted);
    family(out, "gatherd_requests_shed_total", "counter", "Requests refused by max_inflight (503 overloaded).");
    evbuffer_add_printf(out, "gatherd_requests_shed_total %llu\n", (unsigned long long)p.shed);
    family(out, "gatherd_reloads_total", "counter", "Configuration reloads (SIGHUP), by result.");
    evbuffer_add_printf(out, "gatherd_reloads_total{result=\"ok\"} %llu\ngatherd_reloads_total{result=\"failed\"} %llu\n",
                        (unsigned long long)p.reloads_ok, (unsigned long long)p.reloads_failed);
    family(out, "gatherd_last_reload_successful", "gauge", "1 when the last reload was applied (or none was tried).");
    evbuffer_add_printf(out, "gatherd_last_reload_successful %d\n", p.last_reload == 0 || p.last_reload_ok);
    render_runtime(out);
    for (unsigned i = 0; i < nr; i++)
        free(rl[i]);
    for (unsigned i = 0; i < nb; i++)
        free(bl[i]);
    free(rs);
    free(bs);
    free(rl);
    free(bl);
}
